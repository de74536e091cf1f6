"""The scaling study (`limoe reproduce --study scaling`): its plan (every size x length x seed, paired dense and LIMoE
runs), its paired differences and verdicts computed by hand, and the smoke scale end to end."""

import json
import math

import pytest
import torch

from limoe.model.registry import build_model, get_config
from limoe.reproduce import reproduce
from limoe.reproduce.plan import SCALES
from limoe.reproduce.scaling import DENSE, LIMOE, STUDIES, paired, paired_table, plan_scaling, rows, verdict


@pytest.mark.parametrize("scale", list(STUDIES))
def test_every_size_length_and_seed_is_planned_once_for_both_models(scale):
    study = STUDIES[scale]
    jobs = plan_scaling(SCALES[scale])
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    expected = len(study.sizes) * len(study.steps) * 2 * len(study.seeds) + len(study.seeds) * bool(study.more_experts)
    assert len(jobs) == expected
    for job in jobs:
        cfg = job.config("")  # every job is a valid config
        size, steps = job.size.rsplit("-", 1)
        assert cfg.steps == int(steps) and cfg.seed == job.seed
        assert cfg.model_config().paired_init == (job.variant.name == LIMOE)
        if "e" in size:
            assert cfg.model_config().moe_config().num_experts == study.more_experts
    # cheapest sizes first (complete rows while the big ones train), the more-experts runs right after their
    # size; within a size seed by seed, dense beside its LIMoE pair
    sizes = [job.size.split("-")[0].split("e")[0] for job in jobs]
    assert sizes == sorted(sizes, key=[s.name for s in study.sizes].index)
    assert [j.seed for j in jobs if j.size.split("-")[0] == study.sizes[-1].name] == \
        [seed for seed in study.seeds for _ in range(2 * len(study.steps))]
    pairs = [job for job in jobs if "e" not in job.size]
    for first, second in zip(pairs[::2], pairs[1::2]):
        assert (first.variant.name, second.variant.name, first.size, first.seed) == \
            (DENSE, LIMOE, second.size, second.seed)


def test_paired_runs_share_every_weight_but_the_moe_layers():
    """The dense and LIMoE runs of a seed start from the same weights wherever both have a parameter."""
    jobs = {(j.variant.name, j.size, j.seed): j for j in plan_scaling(SCALES["cpu"])}
    models = {}
    for variant in (DENSE, LIMOE):
        cfg = jobs[(variant, "w32-1150", 1)].config("")
        torch.manual_seed(cfg.seed)
        models[variant] = dict(build_model(cfg.model_config()).named_parameters())
    shared = models[DENSE].keys() & models[LIMOE].keys()
    assert len(shared) > 30 and all(".mlp." not in k or "blocks.0." in k or "blocks.2." in k for k in shared)
    for key in shared:
        assert torch.equal(models[DENSE][key], models[LIMOE][key]), key


def _result(variant, budget, seed, seen, held_out, flops=1e12, steps=100):
    return {"job": f"{variant}-{budget}-s{seed}", "variant": variant, "size": budget, "seed": seed, "steps": steps,
            "total_params": 2e6 if variant != DENSE else 1e6, "active_params": 1e6, "train_flops": flops,
            "train_seconds": 1.0, "train_loss": 1.0 + seed, "metrics": {"seen/top1": seen, "zero_shot/top1": held_out,
                                                                        "retrieval/contrastive_loss": 4.0}}


def test_paired_differences_and_verdicts_by_hand():
    results = [_result(DENSE, "w8-100", 0, 0.20, 0.10), _result(DENSE, "w8-100", 1, 0.30, 0.12),
               _result(LIMOE, "w8-100", 0, 0.25, 0.10), _result(LIMOE, "w8-100", 1, 0.36, 0.11),
               _result(LIMOE, "w8-100", 2, 0.50, 0.50),  # no dense seed 2: not paired
               _result(LIMOE, "w8e16-100", 0, 0.21, 0.09), _result(LIMOE, "w8e16-100", 1, 0.29, 0.13)]
    by_budget = {row["budget"]: row for row in paired(results)}
    base = by_budget["w8-100"]
    assert base["seeds"] == [0, 1]
    seen_mean, seen_std = base["seen top-1 %"]  # differences 0.05 and 0.06
    assert seen_mean == pytest.approx(0.055) and seen_std == pytest.approx(math.sqrt(2) * 0.005)
    assert base["held-out top-1 %"] == pytest.approx((-0.005, math.sqrt(2) * 0.005))
    assert base["train loss (last 100 steps)"] == (0.0, 0.0)
    # more experts are paired with dense of the same size and length: differences +0.01 and -0.01
    assert by_budget["w8e16-100"]["seen top-1 %"] == pytest.approx((0.0, math.sqrt(2) * 0.01))
    assert verdict(base["seen top-1 %"]) == "LIMoE"  # 0.055 against twice 0.0071
    assert verdict(base["held-out top-1 %"]) == "level"
    assert verdict((-0.3, 0.1)) == "dense" and verdict((-0.3, 0.1), lower_is_better=True) == "LIMoE"
    assert verdict((0.19, 0.1)) == "level"  # within twice the spread
    assert verdict((0.1, math.nan)) == "-"  # one seed: no spread to judge by
    table = paired_table(results)
    assert "| w8-100 | +5.50 ± 0.71 | -0.50 ± 0.71 |" in table and "LIMoE / level" in table
    row = next(r for r in rows(results) if r["budget"] == "w8-100" and r["variant"] == LIMOE)
    assert row["seeds"] == [0, 1, 2] and row["experts"] == 8


@pytest.mark.slow
def test_smoke_scaling_study_end_to_end(tmp_path, monkeypatch):
    lines = []
    summary = reproduce("smoke", tmp_path, study="scaling", report=lines.append)
    assert summary["failed"] == [] and summary["study"] == "scaling"
    jobs = plan_scaling(SCALES["smoke"])
    assert [r["job"] for r in summary["runs"]] == [j.name for j in jobs]
    for r in summary["runs"]:
        assert math.isfinite(r["train_loss"]) and r["train_flops"] > 0
    stored = json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    assert len(stored["paired"]) == len({j.size for j in jobs})  # every budget has a dense partner
    md = (tmp_path / "results.md").read_text()
    assert "LIMoE minus dense, paired by seed" in md and "quality_vs_compute.png" in md
    assert all(job.command() in md for job in jobs)
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 1000
    # --report-only: nothing trains; a run not finished (its result gone) is left out of the tables
    (tmp_path / "runs" / jobs[0].name / "result.json").unlink()
    monkeypatch.setattr("limoe.train.train", lambda *a, **k: pytest.fail("--report-only trained"))
    again = reproduce("smoke", tmp_path, study="scaling", report_only=True, report=lines.append)
    assert [r["job"] for r in again["runs"]] == [j.name for j in jobs[1:]]
    assert f"{len(jobs) - 1} of the plan's {len(jobs)} runs finished" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="no finished run"):
        reproduce("smoke", tmp_path / "empty", study="scaling", report_only=True)


def test_scaling_study_refuses_the_paper_studys_switches(tmp_path):
    with pytest.raises(ValueError, match="--variants and --no-sweep"):
        reproduce("smoke", tmp_path, study="scaling", sweep=False)
    with pytest.raises(ValueError, match="unknown study"):
        reproduce("smoke", tmp_path, study="sizes")


def test_paired_init_leaves_the_rng_as_dense_and_gives_each_moe_layer_its_own_experts():
    config = get_config("limoe-tiny", paired_init=True, moe_layers="every:1")
    torch.manual_seed(5)
    build_model(get_config("dense-tiny", moe_layers="every:1"))
    dense_rng = torch.get_rng_state()
    torch.manual_seed(5)
    model = build_model(config)
    assert torch.equal(torch.get_rng_state(), dense_rng)  # same data order and draws after the build
    experts = [b.mlp.experts.w_in_Edh for b in model.encoder.blocks]
    assert not any(torch.equal(a, b) for i, a in enumerate(experts) for b in experts[i + 1:])
    torch.manual_seed(6)
    other = build_model(config)
    assert not torch.equal(other.encoder.blocks[0].mlp.experts.w_in_Edh, experts[0])
