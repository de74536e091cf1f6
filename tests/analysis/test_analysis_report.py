"""The HTML report folder and `limoe analyze`: every plot, the JSON of every number, dense models, the CLI."""

import argparse
import json

import pytest
import torch
from PIL import Image

import limoe
from limoe.analysis import analyze_routing
from limoe.analysis.cli import add_analyze_parser
from limoe.analysis.metrics_log import find_metrics, read_metrics
from limoe.analysis.report import write_report
from limoe.checkpoint import FILES
from limoe.train.config import DataConfig, TrainConfig
from _analysis_forced import WORDS, WordTokenizer, images, small_moe_analysis
MOE_PLOTS = ["modality_share.png", "routing_success.png", "expert_usage.png", "token_maps.png",
             "expert_patches.png"]


def write_metrics(path, steps=20, torn=False):
    rows = [{"step": i, "total_loss": 3.0 - 0.1 * i, "contrastive_loss": 2.9 - 0.1 * i, "importance_loss": 0.01,
             "layer1/routing_success/image": 0.6 + 0.01 * i, "layer1/routing_success/text": 0.5 + 0.02 * i}
            for i in range(steps)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + ("\n{\"step\": 20, \"tot" if torn else "\n"))
    return rows


@pytest.fixture(scope="module")
def moe_analysis():
    return small_moe_analysis()


def test_report_has_every_plot_table_and_number(tmp_path, moe_analysis):
    write_metrics(tmp_path / "metrics.jsonl", torn=True)
    index = write_report(moe_analysis, tmp_path / "report", metrics_path=tmp_path / "metrics.jsonl", layer=0)
    page = index.read_text()
    for name in MOE_PLOTS + ["training_curves.png"]:
        assert f'src="{name}"' in page
        with Image.open(index.parent / name) as im:  # a real, decodable PNG
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    data = json.loads((index.parent / "report.json").read_text())
    expected = json.loads(json.dumps(moe_analysis.to_json()))
    assert data["layers"] == expected["layers"] and data["maps"] == expected["maps"]
    assert data["map_layer"] == 0
    assert data["training_curves"] == {"file": "training_curves.png", "steps": 20, "skipped_lines": 1}
    # A table of experts and one of aux losses per layer, plus the settings and the routing summary.
    assert page.count("<table>") == 2 + 2 * len(moe_analysis.layers)
    assert page.count("<h3") == len(moe_analysis.layers)
    first = data["layers"][0]["modality"]["image"]["routing_success"]
    assert f"{first:.3f}" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline


def test_report_without_metrics_says_so(tmp_path, moe_analysis):
    index = write_report(moe_analysis, tmp_path / "report")
    assert "No metrics log" in index.read_text()
    assert not (tmp_path / "report" / "training_curves.png").exists()
    assert all((tmp_path / "report" / name).is_file() for name in MOE_PLOTS)
    with pytest.raises(ValueError, match="layer"):
        write_report(moe_analysis, tmp_path / "other", layer=5)


def test_dense_report_says_nothing_to_route(tmp_path):
    result = analyze_routing(limoe.create_model("dense-tiny", vocab_size=8), WordTokenizer(WORDS),
                             zip(images(2), ["red", "blue"]))
    index = write_report(result, tmp_path / "dense")
    page = index.read_text()
    assert "nothing to route" in page and page.rstrip().endswith("</html>")
    assert not list((tmp_path / "dense").glob("*.png"))
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["has_moe"] is False


def test_metrics_log_reading_and_discovery(tmp_path):
    rows = write_metrics(tmp_path / "metrics.jsonl", steps=3, torn=True)
    assert read_metrics(tmp_path / "metrics.jsonl") == (rows, 1)
    (tmp_path / "checkpoints").mkdir()
    assert find_metrics(tmp_path) == tmp_path / "metrics.jsonl"
    assert find_metrics(tmp_path / "checkpoints" / "step_100.pt") == tmp_path / "metrics.jsonl"
    assert find_metrics(tmp_path / "checkpoints") == tmp_path / "metrics.jsonl"
    assert find_metrics(tmp_path / "elsewhere" / "a" / "b.pt") is None


# -- the command line -------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="limoe")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def csv_pairs(tmp_path, n=6):
    """A CSV dataset of n 32 px PNGs captioned with the test words."""
    lines = ["filepath,title"]
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{WORDS[i % 4]} {WORDS[(i + 1) % 4]}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def fake_checkpoint(tmp_path, monkeypatch, name="limoe-tiny"):
    run = tmp_path / "run"
    run.mkdir()
    for file in FILES:  # the loader below ignores them; the CLI only checks that they exist
        (run / file).write_bytes(b"")
    (run / "state.json").write_text('{"step": 20}')
    write_metrics(run / "metrics.jsonl")
    torch.manual_seed(0)
    model = limoe.create_model(name, num_experts=4, vocab_size=8)
    loaded = []
    run_config = TrainConfig(model=name, data=DataConfig(source="csv", train="pairs.csv"))  # not a built-in set
    monkeypatch.setattr(limoe, "load_checkpoint", lambda path: loaded.append(path) or
                        (model, WordTokenizer(WORDS), run_config), raising=False)
    return run / "model.safetensors", loaded


def test_cli_writes_report_next_to_the_run(tmp_path, monkeypatch, capsys):
    ckpt, loaded = fake_checkpoint(tmp_path, monkeypatch)
    args = parse(["analyze", str(ckpt), "--data", str(csv_pairs(tmp_path)), "--num-pairs", "5",
                  "--batch-size", "4", "--layer", "-2"])
    assert args.func(args) == 0
    assert loaded == [tmp_path / "run"]  # a file inside a checkpoint folder stands for the folder
    out = tmp_path / "run" / "analysis"
    assert str(out / "index.html") in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["num_pairs"] == 5 and data["map_layer"] == 0 and data["training_curves"]["steps"] == 20
    assert (out / "training_curves.png").is_file()


def test_cli_json_for_scripts(tmp_path, monkeypatch, capsys):
    ckpt, _ = fake_checkpoint(tmp_path, monkeypatch, name="dense-tiny")
    args = parse(["analyze", str(ckpt), "--data", str(csv_pairs(tmp_path)), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["has_moe"] is False and data["num_pairs"] == 6
    assert data["metrics_path"] == str(tmp_path / "run" / "metrics.jsonl")
    assert not (tmp_path / "run" / "analysis").exists()  # --json without --out writes no report


def test_cli_errors_are_one_line_as_in_every_command(tmp_path, monkeypatch, capsys):
    from limoe.cli import main

    def one_line(argv, contains):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("limoe: error:") and contains in err[0], err

    one_line(["analyze", str(tmp_path / "missing")], "checkpoint not found")
    ckpt, _ = fake_checkpoint(tmp_path, monkeypatch)
    one_line(["analyze", str(ckpt), "--data", "pairs.parquet"], "--data must be")
    one_line(["analyze", str(ckpt), "--data", str(csv_pairs(tmp_path)), "--layer", "7"], "--layer must be")
    one_line(["analyze", str(ckpt)], "--data held-out needs a run trained on the corpus or the built-in data")


def test_held_out_data_is_the_runs_own_test_split(tmp_path):
    from limoe.analysis.cli import load_pairs

    run = TrainConfig()
    run.data.source, run.data.max_concepts, run.data.cache_dir = "corpus", 40, str(tmp_path)
    corpus = load_pairs("held-out", 32, run_config=run)
    run.data.source = "builtin"
    builtin = load_pairs("held-out", 32, run_config=run)
    assert corpus.name.endswith("test.csv") and "/corpus-" in corpus.name and "/openmoji-" in builtin.name


def test_training_curves_legend_lists_what_is_drawn_in_modality_colours(tmp_path, monkeypatch):
    from limoe.analysis import plots

    rows = [{"kind": "train", "step": s, "routing/routing_success/image": 0.9, "routing/routing_success/text": 0.8,
             "routing/routing_success/image/layer1": 0.7} for s in (10, 20, 30)]
    rows.append({"kind": "final", "step": 30, "train/routing/routing_success/image": 0.9})  # one point: no line
    figures = []
    real = plots.plt.subplots
    monkeypatch.setattr(plots.plt, "subplots", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    assert plots.plot_training_curves(rows, tmp_path / "curves.png").is_file()
    ax = figures[0][1].flat[0]
    drawn = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(drawn)
    assert drawn == {"routing/routing_success/image": (plots.IMAGE_COLOUR, "-"),
                     "routing/routing_success/image/layer1": (plots.IMAGE_COLOUR, "--"),
                     "routing/routing_success/text": (plots.TEXT_COLOUR, "-")}


def test_parser_import_is_light():
    # `limoe --help` builds every sub-command's parser; the analysis one must not import torch or matplotlib.
    import subprocess
    import sys

    code = ("import sys, limoe.analysis.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
