"""A tiny LIMoE must be able to learn: it overfits a small fixed batch of image-caption pairs, real and synthetic."""

import pytest
import torch

import limoe
from limoe.losses import compute_losses

from _model_synth import pairs, tokenize


def _train(name: str, num_pairs: int, steps: int, lr: float = 1e-3, seed: int = 0) -> tuple[float, float, dict]:
    torch.manual_seed(seed)
    images, captions, _ = pairs(num_pairs, seed=seed)
    tokens = tokenize(captions)
    model = limoe.create_model(name, vocab_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        terms = compute_losses(model(images, tokens))
        opt.zero_grad()
        terms["total_loss"].backward()
        opt.step()
        losses.append(terms["contrastive_loss"].item())
    return losses[0], losses[-1], terms


def test_tiny_limoe_overfits_a_fixed_batch():
    first, last, terms = _train("limoe-tiny", num_pairs=8, steps=30)
    assert first > 1.5  # near log(8) = 2.08 at the start: nothing is paired yet
    assert last < 0.15 * first, f"contrastive loss only went from {first:.3f} to {last:.3f}"
    assert all(torch.isfinite(v).all() for v in terms.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["limoe-tiny", "dense-tiny", "two-tower-tiny"])
def test_every_tiny_preset_overfits_sixteen_pairs(name):
    first, last, _ = _train(name, num_pairs=16, steps=80)
    assert last < 0.2 * first, f"{name}: contrastive loss only went from {first:.3f} to {last:.3f}"


def test_tiny_limoe_overfits_real_emoji_pairs(tmp_path):
    # Real pairs: a small subset of the built-in OpenMoji dataset and a BPE tokenizer trained on its captions.
    from limoe.data import BuiltinConfig, builtin_captions, load_builtin, train_tokenizer

    cfg = BuiltinConfig(max_concepts=24, cache_dir=str(tmp_path))
    tok = train_tokenizer(builtin_captions("train", cfg), vocab_size=300)
    samples = load_builtin("train", image_size=32, cfg=cfg).collect()[:8]
    images = torch.stack([image for image, _ in samples])
    batch = tok([caption for _, caption in samples])
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", vocab_size=tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        terms = compute_losses(model(images, batch.ids_BT, valid_BT=~batch.padding_mask_BT))
        opt.zero_grad()
        terms["total_loss"].backward()
        opt.step()
        losses.append(terms["contrastive_loss"].item())
    assert losses[0] > 1.5  # about log(8) before anything is paired
    assert losses[-1] < 0.15 * losses[0], f"contrastive loss only went from {losses[0]:.3f} to {losses[-1]:.3f}"
