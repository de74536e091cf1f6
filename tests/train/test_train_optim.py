"""Schedules as functions of the step, and which parameters get weight decay."""

import math

import pytest

import limoe
from limoe.train.config import OptimConfig
from limoe.train.optim import lr_at, make_optimizer, param_groups


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_rsqrt_and_constant():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="rsqrt")
    assert lr_at(3, cfg, 100) == pytest.approx(1.0)
    assert lr_at(15, cfg, 100) == pytest.approx(math.sqrt(4 / 16))
    assert lr_at(99, cfg, 100) == pytest.approx(math.sqrt(4 / 100))
    const = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const, 10) for s in range(10)} == {0.5}


@pytest.mark.parametrize("name", ["limoe-tiny", "dense-tiny", "two-tower-tiny"])
def test_weight_decay_excludes_biases_norms_embeddings_and_temperature(name):
    model = limoe.create_model(name)
    decay, no_decay = (set(g["names"]) for g in param_groups(model, 0.1))
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    for n in no_decay:
        assert any(w in n for w in ("bias", "b_in", "b_out", "norm", "pos", "probe", "tok.weight", "logit_scale")), n
    for n in decay:
        assert n.endswith(("weight", "_Edh", "_Ehd", "router_dE")) and "norm" not in n, n
    assert "logit_scale" in no_decay and any("experts.w_in" in n for n in decay) == name.startswith("limoe")
    opt = make_optimizer(model, OptimConfig(weight_decay=0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
