"""`limoe reproduce`: the plan trains what the issue asks (matched compute, the right aux-loss / BPR switches),
the helpers compute what they claim (hand cases), and the smoke scale runs end to end, writes its outputs and
skips finished work when rerun."""

import dataclasses
import json
import math

import pytest
import torch

from limoe.cli import main
from limoe.evaluate import k_shot_split
from limoe.model.registry import get_model_info
from limoe.reproduce import SCALES, VARIANT_NAMES, plan_jobs, reproduce
from limoe.reproduce import runner
from limoe.reproduce.plan import ABLATIONS, FULL, plan_ablations
from limoe.reproduce.report import paired_table
from limoe.reproduce.metrics import effective_experts
from limoe.train import apply_overrides, get_preset


# -- helpers, by hand ------------------------------------------------------------------------------------------
def test_k_shot_split_keeps_classes_with_a_test_example():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    train, test, new = k_shot_split(labels, shots=2, seed=3)
    assert new.tolist() == [0, 0, 0, -1, -1, 1, 1, 1, 1]  # class 1 has no example left to test on
    assert sorted(labels[train].tolist()) == [0, 0, 2, 2]
    assert sorted(labels[test].tolist()) == [0, 2, 2]
    assert set(train.tolist()).isdisjoint(test.tolist())
    other = k_shot_split(labels, shots=2, seed=4)[0]
    assert torch.equal(k_shot_split(labels, shots=2, seed=3)[0], train)  # seeded: the same draw again
    assert sorted(labels[other].tolist()) == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="no class has more than 5"):
        k_shot_split(labels, shots=5)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        k_shot_split(labels, shots=0)


@pytest.mark.parametrize("routed, expected", [([5, 5, 5, 5], 4.0), ([0, 9, 0, 0], 1.0), ([3, 3, 0, 0], 2.0),
                                              ([0, 0, 0, 0], 1.0)])
def test_effective_experts(routed, expected):
    assert effective_experts(torch.tensor(routed)) == pytest.approx(expected)


def test_routing_view_counts_specialised_experts_per_layer():
    from limoe.reproduce.report import routing_view

    layer_a = {"image_share": [0.95, 0.05, 0.5, 1.0], "tokens": [10, 10, 10, 0]}  # the idle expert counts for none
    layer_b = {"image_share": [0.9, 0.9, 0.89, 0.2], "tokens": [5, 5, 5, 5]}
    view = routing_view({"eval_routing": {"layers": [layer_a, layer_b], "routing_success": {"image": 0.8}},
                         "train_routing_success": {"text": 1.0}})
    assert view["specialists"] == {"image": pytest.approx((1 + 2) / 2), "text": pytest.approx((1 + 0) / 2)}
    assert view["eval_routing_success"] == {"image": 0.8} and view["train_routing_success"] == {"text": 1.0}
    assert routing_view({"variant": "dense"})["specialists"] == {}


# -- the plan ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", list(SCALES))
def test_every_job_of_every_scale_is_a_valid_config(scale):
    jobs = plan_jobs(SCALES[scale])
    assert {j.variant.name for j in jobs} == set(VARIANT_NAMES)
    assert len({j.name for j in jobs}) == len(jobs)
    for job in jobs:
        job.config("")


def test_variants_switch_exactly_the_aux_losses_and_bpr():
    configs = {j.variant.name: j.config("") for j in plan_jobs(SCALES["cpu"], seeds=(0,)) if j.size == "base"}

    def switches(cfg):
        loss = cfg.resolved().loss
        return (loss.importance > 0, loss.load > 0, any(loss.local_entropy.values()),
                any(loss.global_entropy.values()), cfg.model_config().moe_config().batch_priority)

    assert switches(configs["limoe-plain"]) == (False, False, False, False, False)
    assert switches(configs["limoe-vmoe"]) == (True, True, False, False, False)
    assert switches(configs["limoe-entropy"]) == (True, True, True, True, False)
    assert switches(configs["limoe-entropy-bpr"]) == (True, True, True, True, True)
    # (g), (h): (f) with another router; the losses it reports keep (f)'s weights (not the router's defaults, none),
    # the rest do not apply; the model is (f)'s but for the router (not the router's paper defaults), and for
    # Soft MoE without the preset's evaluation capacity factor, which it does not read.
    recipe_f = configs["limoe-entropy-bpr"]
    for name in ("limoe-ec", "limoe-soft"):
        assert configs[name].resolved().loss == recipe_f.resolved().loss
        moe_f, moe = recipe_f.model_config().moe_config(), configs[name].model_config().moe_config()
        differ = {f.name for f in dataclasses.fields(moe) if getattr(moe, f.name) != getattr(moe_f, f.name)}
        assert differ == ({"router", "noise_std"} if name == "limoe-ec" else {"router", "slots_per_expert",
                                                                               "soft_init", "eval_capacity_factor"})
    # At the cpu scale (f) is the default `limoe train` run itself, evaluated once at the end, on one thread.
    default = get_preset("default")
    default.run_dir = ""
    recipe = default.validate().to_dict()
    assert configs["limoe-entropy-bpr"].to_dict() == {**recipe, "eval": {**recipe["eval"], "interval": 0}, "threads": 1}
    # Everything else, training budget included, is the same for all of them.
    base = {k: v for k, v in configs["dense"].to_dict().items() if k not in ("model", "loss", "moe")}
    for cfg in configs.values():
        assert {k: v for k, v in cfg.to_dict().items() if k not in ("model", "loss", "moe")} == base


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("local_entropy", "global_entropy"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_each_ablation_changes_exactly_its_own_factor_of_the_full_recipe():
    jobs = plan_ablations(SCALES["cpu"])
    assert len(jobs) == (1 + len(ABLATIONS)) * len(SCALES["cpu"].seeds)
    full = {j.seed: j for j in plan_jobs(SCALES["cpu"], variants=(FULL,), sweep=False)}
    expected = {"f-capacity-2": {"moe.capacity_factor"}, "f-no-noise": {"moe.noise_std"},
                "f-independent-experts": {"moe.expert_init"},
                "f-entropy-x3": {"loss.local_entropy", "loss.global_entropy"},
                "f-global-threshold-8": {"moe.global_entropy_min_experts"}}
    assert set(expected) == {v.name for v in ABLATIONS}
    for job in jobs:
        reference = full[job.seed]
        if job.variant.name == FULL:  # the paper study's (f) itself: same name, so one folder serves both
            assert job.name == reference.name and job.command() == reference.command()
            continue
        mine, theirs = _flat(job.config("").to_dict()), _flat(reference.config("").to_dict())
        assert {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)} == \
            expected[job.variant.name], job.name


def test_paired_table_by_hand():
    def result(variant, seed, seen, label="x"):
        return {"variant": variant, "size": "base", "seed": seed, "label": label,
                "metrics": {"seen/top1": seen, "zero_shot/top1": 0.1, "zero_shot/top5": 0.2,
                            "retrieval/contrastive_loss": 4.0}}

    results = [result(FULL, 0, 0.30), result(FULL, 1, 0.32), result("limoe-vmoe", 0, 0.25, "(d)"),
               result("limoe-vmoe", 1, 0.28, "(d)"), result("dense", 1, 0.31, "(a)"), result("dense", 2, 0.2, "(a)")]
    lines = paired_table(results).splitlines()
    # (f) - (d): 5 and 4 points -> 4.50 ± 0.71, beyond twice the spread; (a) shares seed 1 alone: +1, no spread
    assert lines[2] == "| (a) | 1.00 | 0.00 | 0.00 | 0.000 | 1 |"
    assert lines[3] == "| (d) | **4.50 ± 0.71** | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.000 ± 0.000 | 2 |"
    assert paired_table([result("dense", 0, 0.3)]) is None


def test_compared_models_have_matched_active_compute():
    flops = {j.variant.name: get_model_info(j.config("").model_config()).flops_per_pair
             for j in plan_jobs(SCALES["cpu"], seeds=(0,)) if j.size == "base"}
    dense = flops["dense"]
    assert flops["two-tower"] == dense  # each token goes through one tower of the same size
    for name in ("limoe-plain", "limoe-vmoe", "limoe-entropy", "limoe-entropy-bpr", "limoe-ec"):
        assert dense < flops[name] < 1.02 * dense  # K = 1 expert per token plus the router's matmul
    # Soft MoE: as many slots as top-1 capacity, but its dispatch and combine mix every token with every slot of
    # a group (8 pairs of 16 patches + 16 positions at the cpu scale), which costs more than the experts here.
    assert flops["limoe-soft"] > 1.3 * flops["limoe-entropy-bpr"]


def test_job_command_rebuilds_the_job_config():
    job = next(j for j in plan_jobs(SCALES["cpu"]) if j.variant.name == "limoe-vmoe")
    import shlex

    args = shlex.split(job.command())
    assert args[:4] == ["limoe", "train", "--preset", job.preset]
    cfg = get_preset(args[3])
    cfg.model = args[5]
    apply_overrides(cfg, [args[i + 1] for i, a in enumerate(args) if a == "--set"])
    assert cfg.to_dict() == job.config("").to_dict()


def test_unknown_variant_and_bad_parallel_are_one_line_errors(capsys, tmp_path):
    assert main(["reproduce", "--scale", "smoke", "--variants", "dense,nope", "--out", str(tmp_path)]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err
    assert main(["reproduce", "--scale", "smoke", "--parallel", "0", "--out", str(tmp_path)]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err
    assert main(["reproduce", "--scale", "smoke", "--set", "moe.bogus=1", "--out", str(tmp_path)]) == 2
    assert "unknown option 'moe.bogus'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # every config is checked before anything runs


def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    jobs = plan_jobs(SCALES["smoke"], variants=("dense", "two-tower"))[:2]
    def flaky(job, out_dir, device="auto"):
        if job.variant.name == "dense":
            raise RuntimeError("disk full")
        return {"job": job.name, "metrics": {"zero_shot/top1": 0.5, "linear_probe/10shot_balanced": None},
                "train_seconds": 1.0}

    monkeypatch.setattr(runner, "run_job", flaky)
    lines = []
    results = runner.run_jobs(jobs, tmp_path, parallel=1, report=lines.append)
    assert results[0]["error"] == "RuntimeError: disk full"
    assert "disk full" in (tmp_path / "runs" / jobs[0].name / "error.log").read_text()
    assert results[1]["job"] == jobs[1].name and "error" not in results[1]
    assert "FAILED RuntimeError: disk full" in lines[0]
    assert "held-out top-1 50.00%, 10-shot probe nan%" in lines[1]


def test_a_run_folder_of_another_configuration_is_refused(tmp_path):
    job, other = plan_jobs(SCALES["smoke"], variants=("limoe-plain", "limoe-vmoe"), seeds=(0,), sweep=False)
    run_dir = tmp_path / "runs" / job.name
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "config.json").write_text(other.config(str(run_dir)).to_json())
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        runner.run_job(job, tmp_path)


def test_a_finished_result_of_another_configuration_is_not_reused(tmp_path):
    # Same command, other config (a changed default, e.g. the data): the stored result must not be passed off.
    job, other = plan_jobs(SCALES["smoke"], variants=("limoe-plain", "limoe-vmoe"), seeds=(0,), sweep=False)
    run_dir = tmp_path / "runs" / job.name
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "config.json").write_text(other.config(str(run_dir)).to_json())
    runner.write_json(run_dir / runner.RESULT_FILE, {"command": job.command(), "eval_version": runner.EVAL_VERSION})
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        runner.run_job(job, tmp_path)


def test_a_finished_result_in_a_moved_folder_is_reused(tmp_path):
    # The stored config names the folder the run was trained in; a results folder copied elsewhere is the same run.
    job = plan_jobs(SCALES["smoke"], variants=("limoe-plain",), seeds=(0,), sweep=False)[0]
    run_dir = tmp_path / "runs" / job.name
    run_dir.mkdir(parents=True)
    stored_config = job.config(str(tmp_path / "elsewhere" / job.name))
    stored_config.checkpoint_interval += 100  # saving more or less often trains the same run
    (run_dir / "config.json").write_text(stored_config.to_json())
    stored = {"command": job.command(), "eval_version": runner.EVAL_VERSION, "job": job.name}
    runner.write_json(run_dir / runner.RESULT_FILE, stored)
    assert runner.run_job(job, tmp_path) == stored


def test_a_changed_plan_is_refused_before_anything_trains_or_is_written(tmp_path):
    job, other = plan_jobs(SCALES["smoke"], variants=("limoe-plain", "limoe-vmoe"), seeds=(0,), sweep=False)
    run_dir = tmp_path / "runs" / job.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(other.config(str(run_dir)).to_json())
    (tmp_path / "results.md").write_text("the last reproduction's table")
    with pytest.raises(ValueError, match=f"holds runs of another configuration .*: {job.name}; move them away"):
        reproduce("smoke", tmp_path, report=lambda line: None)
    assert (tmp_path / "results.md").read_text() == "the last reproduction's table"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [job.name]


def test_study_overrides_reach_every_run_but_not_the_variant_switches():
    jobs = plan_jobs(SCALES["cpu"], overrides=("moe.num_experts=16", "loss.importance=0.5"), sweep=False)
    assert len(jobs) == len(VARIANT_NAMES) * len(SCALES["cpu"].seeds)
    for job in jobs:
        cfg = job.config("")
        assert cfg.moe["num_experts"] == 16
        assert cfg.loss.importance == (0 if job.variant.name == "limoe-plain" else 0.5)


# -- the smoke scale, end to end (the CI version of the CPU reproduction) -------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    lines = []
    summary = reproduce("smoke", out, report=lines.append)
    return out, summary, lines


@pytest.mark.slow
def test_smoke_reproduction_writes_table_plots_and_report(smoke):
    out, summary, _ = smoke
    assert summary["failed"] == []
    results = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert len(results["runs"]) == len(plan_jobs(SCALES["smoke"]))
    md = (out / "results.md").read_text()
    for variant in plan_jobs(SCALES["smoke"]):
        assert variant.variant.label in md
        assert variant.command() in md
    for png in ("accuracy_vs_compute.png", "routing_success.png", "expert_specialisation.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "analysis" / "index.html").is_file()
    assert "min / run (training / in all)" in md


@pytest.mark.slow
def test_smoke_results_are_consistent(smoke):
    _, summary, _ = smoke
    for r in summary["runs"]:
        assert r["train_flops"] == 3 * get_model_info(_config_of(r).model_config()).flops_per_pair * r["batch_size"] \
            * r["steps"]
        assert r["run_seconds"] > r["train_seconds"] > 0  # a run's time counts its evaluation too
        m = r["metrics"]
        assert 0 <= m["zero_shot/top1"] <= m["zero_shot/top5"] <= 1
        assert 0 < m["linear_probe/10shot_balanced"] < 1 and 0 < m["linear_probe/10shot"] < 1
        if r["variant"].startswith("limoe"):
            for modality in ("image", "text"):
                assert 0 <= r["train_routing_success"][modality] <= 1
                assert 0 <= r["eval_routing"]["routing_success"][modality] <= 1
                experts = _config_of(r).model_config().moe_config().num_experts
                assert 1 <= r["eval_routing"]["effective_experts"][modality] <= experts + 1e-9
            for layer in r["eval_routing"]["layers"]:
                # An expert that got no token has no share (NaN; null in the JSON): with 8 experts and 4 tiny
                # steps Soft MoE can leave one unused.
                assert all(s is None or math.isnan(s) or 0 <= s <= 1 for s in layer["image_share"])
                assert sum(s is not None and not math.isnan(s) for s in layer["image_share"]) >= 4
        else:
            assert "train_routing_success" not in r


@pytest.mark.slow
def test_smoke_rerun_skips_finished_runs(smoke, monkeypatch):
    out, summary, _ = smoke

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("limoe.train.train", no_training)
    again = reproduce("smoke", out, report=lambda line: None)
    assert [r["job"] for r in again["runs"]] == [r["job"] for r in summary["runs"]]
    assert again["runs"][0]["metrics"]["zero_shot/top1"] == summary["runs"][0]["metrics"]["zero_shot/top1"]
    assert not math.isnan(again["minutes"])


@pytest.mark.slow
def test_a_damaged_result_is_made_again_from_the_checkpoint(smoke, monkeypatch, capsys):
    out, summary, _ = smoke
    first = summary["runs"][0]
    job = next(j for j in plan_jobs(SCALES["smoke"]) if j.name == first["job"])
    result_file = out / "runs" / job.name / runner.RESULT_FILE
    result_file.write_text(result_file.read_text()[:100])  # cut short, as by a full disk

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("limoe.train.train", no_training)
    again = runner.run_job(job, out)
    assert f"{result_file} is unreadable" in capsys.readouterr().err
    assert again["metrics"]["zero_shot/top1"] == first["metrics"]["zero_shot/top1"]
    assert json.loads(result_file.read_text())["job"] == job.name


def _config_of(result):
    job = next(j for j in plan_jobs(SCALES["smoke"]) if j.name == result["job"])
    return job.config("")
