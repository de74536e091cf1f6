"""The benchmark scripts run end to end on a tiny size and report consistent rows."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch


def _load(name):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_layer_benchmark_smoke(tmp_path, capsys):
    rows = _load("moe_layer").main(["--device", "cpu", "--dim", "16", "--hidden", "32", "--tokens", "256",
                                    "--experts", "4", "--reps", "2", "--warmup", "1", "--json",
                                    str(tmp_path / "rows.json")])
    # Every router side by side with dense; the routers without BPR in the first configuration only.
    assert [r["variant"] for r in rows] == ["dense MLP", "MoE E=4 bpr=0 bmm", "MoE E=4 expert_choice bmm",
                                            "MoE E=4 soft", "one-hot einsum E=4",
                                            "dense MLP", "MoE E=4 bpr=1 bmm", "one-hot einsum E=4"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["ratio_to_dense"] == 1.0
    # Active FLOPs of forward+backward: 2 matmuls x 2*S*d*h, times 3.
    assert abs(rows[0]["tflops"] * rows[0]["ms"] * 1e9 - 12 * 256 * 16 * 32) < 1e-3
    assert json.loads((tmp_path / "rows.json").read_text()) == rows and "x dense" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_moe_layer_benchmark_runs_both_backends():
    rows = _load("moe_layer").main(["--device", "cpu", "--dim", "16", "--hidden", "32", "--tokens", "128",
                                    "--experts", "4", "--bpr", "1", "--backends", "bmm", "grouped_mm",
                                    "--no-onehot", "--reps", "1", "--warmup", "0"])
    assert [r["variant"] for r in rows] == ["dense MLP", "MoE E=4 bpr=1 bmm", "MoE E=4 bpr=1 grouped_mm",
                                            "MoE E=4 expert_choice bmm", "MoE E=4 expert_choice grouped_mm",
                                            "MoE E=4 soft"]


@pytest.mark.parametrize("script, argv, flag", [
    ("moe_layer", ["--tokens", "0"], "--tokens"),
    ("moe_layer", ["--warmup", "-1"], "--warmup"),
    ("moe_layer", ["--tokens", "100", "--group-tokens", "30"], "--group-tokens"),
    ("train_step", ["--tiny", "--batch", "0"], "--batch"),
    ("train_step", ["--tiny", "--peak-tflops", "0"], "--peak-tflops"),
    ("train_step", ["--tiny", "--profile", "-2"], "--profile"),
])
def test_benchmarks_reject_bad_arguments(script, argv, flag):
    with pytest.raises(ValueError, match=flag):
        _load(script).main(["--device", "cpu", *argv])


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_step_benchmark_tiny(tmp_path, capsys, restore_threads):
    # One thread: on a shared 2-core machine two OpenMP threads can make a 20 ms step take seconds.
    rows = _load("train_step").main(["--tiny", "--device", "cpu", "--batch", "4", "--reps", "2", "--warmup", "0",
                                     "--threads", "1", "--profile", "1", "--json", str(tmp_path / "out.json")])
    assert [r["model"] for r in rows] == ["dense-tiny", "limoe-tiny"]
    dense, moe = rows
    assert dense["ratio_to_dense"] == 1.0 and moe["ratio_to_dense"] == dense["ms"] / moe["ms"]
    assert dense["train_flops_per_pair"] == moe["train_flops_per_pair"]  # MFU on dense-equivalent FLOPs
    assert moe["total_params"] > dense["total_params"] and all(math.isfinite(r["loss"]) for r in rows)
    assert moe["mfu"] == pytest.approx(moe["pairs_per_s"] * moe["train_flops_per_pair"] / 989e12)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["rows"] == rows and set(saved["profile"]) == {"dense-tiny", "limoe-tiny"}
    out = capsys.readouterr().out
    assert "x dense" in out and "limoe-tiny: operator time" in out


def test_train_step_benchmark_times_each_routing_grouping(restore_threads):
    rows = _load("train_step").main(["--tiny", "--device", "cpu", "--batch", "8", "--reps", "1", "--warmup", "0",
                                     "--threads", "1", "--routing-groups", "joint", "per_modality"])
    assert [r["model"] for r in rows] == ["dense-tiny", "limoe-tiny/joint", "limoe-tiny/per_modality"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[1]["loss"] != rows[2]["loss"]  # really two groupings: they route, and so train, differently


def test_expert_parallel_benchmark_smoke(tmp_path, capsys, monkeypatch):
    # Imported by name, not from a file spec: the spawned ranks must be able to import the module themselves.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    rows = importlib.import_module("expert_parallel").main(["--dim", "16", "--hidden", "32", "--tokens", "64", "--experts", "4",
                                          "--reps", "2", "--warmup", "1", "--json", str(tmp_path / "rows.json")])
    assert [r["variant"] for r in rows] == ["single", "expert-par", "a2a only"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["ratio_to_single"] == 1.0
    assert (tmp_path / "rows.json").exists() and "exchange overhead" in capsys.readouterr().out


def test_moe_layer_benchmark_routing_groups():
    rows = _load("moe_layer").main(["--device", "cpu", "--dim", "16", "--hidden", "32", "--tokens", "256",
                                    "--group-tokens", "64", "--experts", "4", "--bpr", "0", "--routers", "soft",
                                    "top_k", "--reps", "1", "--warmup", "0"])
    # Several groups: no one-hot row (it knows one group only).
    assert [r["variant"] for r in rows] == ["dense MLP", "MoE E=4 bpr=0 bmm", "MoE E=4 soft"]
