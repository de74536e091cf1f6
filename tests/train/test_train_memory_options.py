"""The training options that trade compute for memory or precision: activation checkpointing changes nothing
but memory, `precision` chooses the forward's autocast."""

import warnings

import pytest
import torch

import limoe
from limoe.losses import compute_losses
from limoe.train import train
from limoe.train.config import ConfigError, TrainConfig, apply_overrides
from limoe.train.step import autocast

from _model_synth import random_batch
from _train_utils import tiny_config


def _losses_and_grads(name: str, recompute: bool):
    torch.manual_seed(0)
    model = limoe.create_model(name)
    model.train()  # with router noise: the recomputation must draw the forward's noise again
    model.set_activation_checkpointing(recompute)
    images, tokens = random_batch(model.config, 8, 0)
    torch.manual_seed(1)
    terms = compute_losses(model(images, tokens))
    terms["total_loss"].backward()
    return ({k: v.detach() for k, v in terms.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("name", ["limoe-tiny", "two-tower-tiny"])
def test_activation_checkpointing_gives_identical_losses_and_gradients(name):
    plain_terms, plain_grads = _losses_and_grads(name, recompute=False)
    terms, grads = _losses_and_grads(name, recompute=True)
    assert terms.keys() == plain_terms.keys() and grads.keys() == plain_grads.keys()
    for key in terms:  # the aux losses come out of the checkpointed blocks too
        assert torch.equal(terms[key], plain_terms[key]), key
    for key in grads:
        assert torch.equal(grads[key], plain_grads[key]), key


def test_activation_checkpointing_stores_fewer_activations():
    # What it is for: the tensors the autograd graph keeps for the backward shrink to each block's input.
    def saved_bytes(recompute: bool) -> int:
        torch.manual_seed(0)
        model = limoe.create_model("limoe-tiny")
        model.set_activation_checkpointing(recompute)
        images, tokens = random_batch(model.config, 8, 0)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compute_losses(model(images, tokens))["total_loss"]
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_precision_picks_the_autocast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not isinstance(autocast(cpu, "auto"), torch.autocast)  # CPU trains in float32 by default
    assert isinstance(autocast(cpu, "bf16"), torch.autocast)
    with warnings.catch_warnings():  # "CUDA is not available": the choice is what is tested, not CUDA
        warnings.simplefilter("ignore")
        assert isinstance(autocast(cuda, "auto"), torch.autocast)
        assert not isinstance(autocast(cuda, "fp32"), torch.autocast)
    with autocast(cpu, "bf16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


def test_bf16_training_runs_on_cpu_and_differs_from_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path / precision, tmp_path / "cache", steps=2, checkpoint_interval=0)
        cfg.eval.zero_shot = cfg.eval.retrieval = False
        apply_overrides(cfg, [f"precision={precision}"])
        losses[precision] = train(cfg, progress=False).losses
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_unknown_precision_is_one_line_error():
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(TrainConfig(), ["precision=fp16"]).validate()
