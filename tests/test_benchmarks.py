"""The benchmark scripts run end to end on a tiny size and report consistent rows."""

import importlib.util
from pathlib import Path


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
    assert [r["variant"] for r in rows] == ["dense MLP", "MoE E=4 bpr=0", "one-hot einsum E=4",
                                            "dense MLP", "MoE E=4 bpr=1", "one-hot einsum E=4"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["ratio_to_dense"] == 1.0
    assert (tmp_path / "rows.json").exists() and "x dense" in capsys.readouterr().out


def test_expert_parallel_benchmark_smoke(tmp_path, capsys, monkeypatch):
    # Imported by name, not from a file spec: the spawned ranks must be able to import the module themselves.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    rows = importlib.import_module("expert_parallel").main(["--dim", "16", "--hidden", "32", "--tokens", "64", "--experts", "4",
                                          "--reps", "2", "--warmup", "1", "--json", str(tmp_path / "rows.json")])
    assert [r["variant"] for r in rows] == ["single", "expert-par", "a2a only"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["ratio_to_single"] == 1.0
    assert (tmp_path / "rows.json").exists() and "exchange overhead" in capsys.readouterr().out
