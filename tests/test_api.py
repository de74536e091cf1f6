"""The open_clip-shaped API: README's example runs, models and transforms from a checkpoint, the tokenizer
returns ids, list_models takes wildcards, normalize= and logit_scale mean what they mean in open_clip, and
SigLIP starts from its authors' bias."""

import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import limoe
from limoe.losses import compute_losses
from limoe.train import train
from limoe.train.config import TrainConfig, apply_overrides

from _train_utils import tiny_config

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = tiny_config(tmp, steps=2)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    train(cfg, progress=False)
    return Path(cfg.run_dir)


def test_readme_example_runs(run_dir, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "create_model_and_transforms" in b)
    Image.new("RGBA", (40, 40), (220, 30, 40, 255)).save(tmp_path / "heart.png")
    code = block.replace("runs/my-run", str(run_dir)).replace("heart.png", str(tmp_path / "heart.png"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["probs"].shape == (1, 3) and torch.allclose(scope["probs"].sum(), torch.tensor(1.0))
    assert torch.allclose(scope["image_features"].norm(dim=-1), torch.tensor(1.0))


def test_pretrained_model_is_the_checkpoints(run_dir):
    loaded, _, _ = limoe.load_checkpoint(run_dir)
    model = limoe.create_model("limoe-tiny", pretrained=run_dir)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="holds a limoe-tiny model, not dense-tiny"):
        limoe.create_model("dense-tiny", pretrained=run_dir)
    with pytest.raises(ValueError, match="needs a model name or pretrained"):
        limoe.create_model()


def test_transforms_take_any_image_and_train_crops_differ(run_dir):
    model, train_tf, eval_tf = limoe.create_model_and_transforms(pretrained=run_dir)
    size = model.config.image_size
    for mode in ("RGB", "RGBA", "L", "P", "I;16"):
        assert eval_tf(Image.new(mode, (50, 30))).shape == (3, size, size)
    image = Image.linear_gradient("L").convert("RGB")
    assert torch.equal(eval_tf(image), eval_tf(image))
    torch.manual_seed(0)
    first, second = train_tf(image), train_tf(image)
    torch.manual_seed(0)
    assert not torch.equal(first, second) and torch.equal(first, train_tf(image))


def test_tokenizer_returns_ids_that_encode_text_takes(run_dir):
    tokenizer = limoe.get_tokenizer(run_dir)
    ids = tokenizer(["a red heart", "a cat"])
    assert ids.dtype == torch.int64 and ids.shape == (2, tokenizer.context_length)
    assert tokenizer("a cat").shape == (1, tokenizer.context_length)
    model, own_tokenizer, _ = limoe.load_checkpoint(run_dir)
    # ids alone (padding = pad id) and the full TokenBatch encode the same
    batch = own_tokenizer(["a red heart", "a cat"])
    assert torch.equal(ids, batch.ids_BT)
    assert torch.allclose(model.encode_text(ids), model.encode_text(batch), atol=1e-6)
    with pytest.raises(ValueError, match="is a preset"):
        limoe.get_tokenizer("limoe-tiny")


def test_list_models_takes_wildcards_and_prefixes():
    assert limoe.list_models("*b16*") == ["dense-b16", "limoe-b16", "two-tower-b16"]
    assert limoe.list_models("limoe-") == limoe.list_models("limoe-*") and "limoe-tiny" in limoe.list_models("limoe-")
    assert limoe.list_models("*nothing*") == []


def test_normalize_flag_as_open_clip():
    model = limoe.create_model("limoe-tiny", vocab_size=64).eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 64, (2, 16))
    raw, unit = model.encode_image(images), model.encode_image(images, normalize=True)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2)) and torch.allclose(unit.norm(dim=-1), torch.ones(2))
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), unit, atol=1e-6)
    assert torch.allclose(model.encode_text(tokens, normalize=True).norm(dim=-1), torch.ones(2))


def test_logit_scale_is_the_log_multiplier_and_the_cap_keeps_its_gradient():
    model = limoe.create_model("dense-tiny", vocab_size=64)
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))  # past the cap of 100
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 64, (4, 16)))
    assert out.logit_scale.item() == pytest.approx(150.0)  # forward does not clamp ...
    compute_losses(out)["total_loss"].backward()
    assert model.logit_scale.grad.abs().item() > 0  # ... so the gradient can bring it back
    model.clamp_logit_scale()  # what the training loop does after each step
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_sigmoid_loss_gets_siglips_bias_by_default():
    cfg = apply_overrides(TrainConfig(), ["loss.contrastive=sigmoid"])
    assert cfg.model_config().logit_bias_init == -10.0
    assert cfg.model_config().temperature_init == pytest.approx(math.log(10.0))
    assert apply_overrides(cfg, ["model.logit_bias_init=-5"]).model_config().logit_bias_init == -5.0
    assert TrainConfig().model_config().logit_bias_init is None  # softmax has no bias
