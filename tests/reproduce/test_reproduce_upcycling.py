"""The upcycling study (`limoe reproduce --study upcycling`): its plan shares the scaling study's runs, the upcycled
run starts from its dense parent's folder wherever the study lies, the report adds the parent's FLOPs and pairs by
seed, and the runner never starts a run before the one it starts from."""

import json
import math

import pytest

from limoe.reproduce import SCALES, reproduce
from limoe.reproduce import runner
from limoe.reproduce.scaling import DENSE, LIMOE, plan_scaling
from limoe.reproduce.upcycling import UPCYCLED, paired, plan_upcycling, rows


def test_plan_adds_only_the_upcycled_runs_to_the_scaling_study():
    jobs = plan_upcycling(SCALES["cpu"])
    assert [j.name for j in jobs[:4]] == ["dense-w64-1150-s0", "limoe-upcycled-w64-2300-s0", "dense-w64-2300-s0",
                                          "limoe-entropy-bpr-w64-2300-s0"]
    assert len(jobs) == 12
    scaling = {j.name: j for j in plan_scaling(SCALES["cpu"])}
    for job in jobs:
        if job.variant != UPCYCLED:  # the very runs of the scaling study: its folder holds them
            assert job == scaling[job.name]
    upcycled = jobs[1]
    assert upcycled.after == "dense-w64-1150-s0" and "init_from=RUNS/dense-w64-1150-s0" in upcycled.command()
    assert "steps=1150" in upcycled.overrides and "model.paired_init=true" not in upcycled.overrides
    with pytest.raises(ValueError, match="no gpu scale"):
        plan_upcycling(SCALES["gpu"])


def test_the_starting_run_is_found_wherever_the_study_lies(tmp_path):
    job = plan_upcycling(SCALES["cpu"])[1]
    for out in (tmp_path / "a", tmp_path / "b"):
        cfg = job.config(str(out / "runs" / job.name))
        assert cfg.init_from == str(out / "runs" / "dense-w64-1150-s0")
    # A moved study is the same study: where the parent lies is not part of what the run trains.
    (tmp_path / "a" / "runs" / job.name).mkdir(parents=True)
    (tmp_path / "a" / "runs" / job.name / "config.json").write_text(
        job.config(str(tmp_path / "a" / "runs" / job.name)).to_json())
    assert runner._same_config(tmp_path / "a" / "runs" / job.name, job.config(str(tmp_path / "b" / "runs" / "x")))
    with pytest.raises(ValueError, match="starts from the run dense-w64-1150-s0, which has not finished"):
        runner.run_job(job, tmp_path / "a")


def _result(variant, budget, seed, steps, flops, seen, held_out):
    return {"job": f"{variant}-{budget}-s{seed}", "variant": variant, "size": budget, "seed": seed, "steps": steps,
            "train_flops": flops, "train_seconds": 1.0, "train_loss": 2.0,
            "metrics": {"seen/top1": seen, "zero_shot/top1": held_out, "retrieval/contrastive_loss": 4.0}}


def test_report_by_hand():
    results = []
    for seed, (up, dense2) in enumerate(((0.30, 0.25), (0.34, 0.27))):
        results += [_result(DENSE, "w8-10", seed, 10, 1e9, 0.1, 0.1),
                    _result(UPCYCLED.name, "w8-20", seed, 10, 1.1e9, up, 0.2),
                    _result(DENSE, "w8-20", seed, 20, 2e9, dense2, 0.2),
                    _result(LIMOE, "w8-20", seed, 20, 2.2e9, up, 0.3)]
    table = {row["model"]: row for row in rows(results, 10)}
    assert table["upcycled"]["train_flops"] == pytest.approx(2.1e9)  # 1.1 of its own + its parent's 1.0
    assert table["upcycled"]["steps"] == 20 and table["upcycled"]["seen top-1 %"][0] == pytest.approx(0.32)
    against = {row["against"]: row for row in paired(results, 10)}
    dense = against["dense, 20 steps"]
    # differences 0.05 and 0.07
    assert dense["seen top-1 %"] == pytest.approx((0.06, math.sqrt(2) * 0.01))
    assert against["LIMoE from scratch, 20 steps"]["held-out top-1 %"] == pytest.approx((-0.1, 0.0))
    # An upcycled run whose parent is missing is left out rather than counted at half its compute.
    assert next(row for row in rows(results[1:], 10) if row["model"] == "upcycled")["seeds"] == [1]


@pytest.mark.slow
def test_smoke_upcycling_end_to_end_two_at_a_time(tmp_path):
    lines = []
    summary = reproduce("smoke", tmp_path, study="upcycling", parallel=2, report=lines.append)
    assert summary["failed"] == [], lines
    jobs = plan_upcycling(SCALES["smoke"])
    assert sorted(r["job"] for r in summary["runs"]) == sorted(j.name for j in jobs)
    upcycled = json.loads((tmp_path / "runs" / jobs[1].name / "config.json").read_text())
    assert upcycled["init_from"] == str(tmp_path / "runs" / jobs[0].name)
    md = (tmp_path / "upcycling.md").read_text()
    assert "| upcycled | 2 + 2 |" in md and "| dense, 4 steps |" in md
