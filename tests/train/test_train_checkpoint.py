"""Checkpoints: exact round trip without pickles, keep-last-N, `latest` resolution, kill-safety."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import limoe
from limoe import checkpoint as ckpt
from limoe.data import train_tokenizer
from limoe.losses import compute_losses
from limoe.train.config import OptimConfig, TrainConfig
from limoe.train.optim import make_optimizer


def _model_and_optimizer(width=64):
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", vocab_size=64, width=width)
    opt = make_optimizer(model, OptimConfig())
    terms = compute_losses(model(torch.randn(4, 3, 32, 32), torch.randint(1, 64, (4, 16))))
    terms["total_loss"].backward()
    opt.step()
    return model, opt


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a cat", "a dog", "thumbs up", "red heart"] * 4, vocab_size=64)


def _save(run, step, model, opt, tokenizer, keep_last=None):
    return ckpt.save_checkpoint(run, step, model, opt, {"step": step, "data": {"0": {"epoch": 0, "batch": step}}},
                                TrainConfig().to_json(), tokenizer, keep_last)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, tokenizer):
    model, opt = _model_and_optimizer()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    path = _save(tmp_path, 1, model, opt, tokenizer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert sorted(os.listdir(path)) == sorted(ckpt.FILES)

    other, other_opt = _model_and_optimizer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    ckpt.load_weights(other, path)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    state, tensors = ckpt.read_state(path)
    fresh = make_optimizer(other, OptimConfig())
    ckpt.load_optimizer_state(fresh, tensors, state["optimizer"])
    for p_a, p_b in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_a][key], fresh.state[p_b][key])
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    ckpt.set_rng_state(tensors, state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]

    loaded, tok, config = limoe.load_checkpoint(str(path))
    assert not loaded.training and tok.vocab_size == tokenizer.vocab_size and config == TrainConfig()
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model.encode_image(images), loaded.encode_image(images))


def test_checkpoint_from_before_routing_groups_loads_and_routes_as_it_did(tmp_path, tokenizer):
    # A model.json written before routing groups existed has no group_size / routing_groups: it loads, and a
    # modality alone routes as one group per call, as that model was evaluated then.
    import json

    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt, tokenizer)
    model_json = json.loads((path / "model.json").read_text())
    assert model_json["moe"]["group_size"] == 8
    del model_json["moe"]["group_size"]
    (path / "model.json").write_text(json.dumps(model_json))
    loaded, _, _ = limoe.load_checkpoint(str(path))
    assert loaded.config.moe_config().group_size is None
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        _, aux = loaded.encode_image(images, return_aux=True)
    assert aux[0].routing.num_groups == 1 and aux[0].routing.capacity == loaded.encoder.blocks[1].mlp.capacity_for(80)
    for p_a, p_b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p_a, p_b)


def test_keep_last_and_latest(tmp_path, tokenizer):
    model, opt = _model_and_optimizer()
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, model, opt, tokenizer, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert ckpt.resolve("latest", tmp_path).name == "step_00000040"
    assert ckpt.resolve(tmp_path).name == "step_00000040"  # a run directory means its latest
    _save(tmp_path, 40, model, opt, tokenizer, keep_last=2)  # the same step again replaces it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]


def test_missing_and_incompatible_checkpoints_give_one_line(tmp_path, tokenizer):
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.resolve(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume from"):
        ckpt.resolve("latest", tmp_path)
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt, tokenizer)
    wider = limoe.create_model("limoe-tiny", vocab_size=64, width=96)
    with pytest.raises(ckpt.CheckpointError, match="incompatible with this model") as info:
        ckpt.load_weights(wider, path)
    assert "\n" not in str(info.value)
    (path / "state.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve(path)


def test_interrupted_write_leaves_previous_checkpoint_as_latest(tmp_path, tokenizer):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt, tokenizer)
    # A writer killed mid-checkpoint leaves a temporary folder (and possibly a half-written file).
    partial = ckpt.checkpoints_dir(tmp_path) / ".tmp-step_00000002-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert ckpt.resolve("latest", tmp_path).name == "step_00000001"
    limoe.load_checkpoint(str(tmp_path))
    _save(tmp_path, 3, model, opt, tokenizer)  # the next writer removes the leftovers
    assert not partial.exists()


def test_sigkill_during_a_checkpoint_write(tmp_path):
    # A real writer process, killed with SIGKILL while its second checkpoint is half written.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, limoe
        from limoe import checkpoint as ckpt
        from limoe.data import train_tokenizer
        from limoe.train.config import OptimConfig, TrainConfig
        from limoe.train.optim import make_optimizer
        tok = train_tokenizer(["a cat", "a dog"] * 4, vocab_size=64)
        model = limoe.create_model("limoe-tiny", vocab_size=64)
        opt = make_optimizer(model, OptimConfig())
        save = lambda step: ckpt.save_checkpoint({str(tmp_path)!r}, step, model, opt, {{"step": step}},
                                                 TrainConfig().to_json(), tok)
        save(1)
        real = ckpt.save._fsync_write
        def slow(path, data):
            real(path, data[: len(data) // 2])  # half a file on disk, then hang
            print("writing", flush=True)
            time.sleep(60)
        ckpt.save._fsync_write = slow
        save(2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    leftovers = [p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()]
    assert any(name.startswith(".tmp-step_00000002") for name in leftovers)
    assert ckpt.resolve("latest", tmp_path).name == "step_00000001"
    model, _, _ = limoe.load_checkpoint(str(tmp_path))
    assert model.config.vocab_size == 64
