"""The routing report says what it is of (checkpoint, step, data), prints counts as integers, keeps legends off
the bars, and draws the aux losses on an axis of their own."""

import argparse
import json
import re

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import limoe
from limoe.analysis import plots
from limoe.analysis.cli import add_analyze_parser
from limoe.analysis.report import write_report
from limoe.checkpoint import FILES
from limoe.train.config import DataConfig, TrainConfig
from _analysis_forced import WORDS, WordTokenizer, small_moe_analysis


@pytest.fixture(scope="module")
def analysis():
    return small_moe_analysis()


def _figures(monkeypatch) -> list:
    figures, real = [], plots.plt.subplots
    monkeypatch.setattr(plots.plt, "subplots", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    return figures


def test_report_names_checkpoint_step_and_data_and_prints_counts_as_integers(tmp_path, analysis):
    source = {"checkpoint": "runs/r/checkpoints/step_00000900", "step": 900, "data": "held-out pairs, test.csv"}
    index = write_report(analysis, tmp_path / "report", source=source)
    page = index.read_text()
    assert "Checkpoint runs/r/checkpoints/step_00000900 (step 900) on held-out pairs, test.csv: " in page
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["source"] == source
    counts = [c for layer in data["layers"] for c in (
        *(layer["modality"][m][k] for m in ("image", "text") for k in ("tokens", "top1_kept", "dropped")),
        *(e[k][m] for e in layer["experts"] for k in ("processed", "routed") for m in ("image", "text")))]
    assert all(type(c) is int for c in counts) and min(counts) < 10
    cells = re.findall(r'<td class="num">([^<]*)</td>', page)
    shown = [c for layer in data["layers"] for e in layer["experts"] for c in e["processed"].values()]
    assert all(str(c) in cells for c in shown)  # "9", where a count under 10 used to print as "9.000"


def test_cli_report_says_which_checkpoint_and_pairs(tmp_path, monkeypatch):
    run = tmp_path / "run" / "checkpoints" / "step_00000007"
    run.mkdir(parents=True)
    for name in FILES:  # the loader is replaced below; the command only checks that they are there
        (run / name).write_bytes(b"")
    (run / "state.json").write_text('{"step": 7}')
    model = limoe.create_model("limoe-tiny", num_experts=4, vocab_size=8)
    config = TrainConfig(model="limoe-tiny", data=DataConfig(source="csv", train="pairs.csv"))
    monkeypatch.setattr(limoe, "load_checkpoint", lambda path: (model, WordTokenizer(WORDS), config), raising=False)
    lines = ["filepath,title"]
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 90, 20)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{WORDS[i]}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(run.parent.parent), "--data", str(tmp_path / "pairs.csv"), "--out",
                              str(tmp_path / "o")])  # a run folder: its latest checkpoint is named
    assert args.func(args) == 0
    source = json.loads((tmp_path / "o" / "report.json").read_text())["source"]
    assert source == {"checkpoint": str(run), "step": 7, "data": str(tmp_path / "pairs.csv"), "sample_seed": 0}


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_stay_off_the_bars(tmp_path, analysis, monkeypatch):
    figures = _figures(monkeypatch)
    plots.plot_modality_share(analysis, tmp_path / "share.png")
    plots.plot_routing_success(analysis, tmp_path / "success.png")
    for fig, axes in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed once saved
        legends = fig.legends + [ax.get_legend() for ax in getattr(axes, "flat", [axes]) if ax.get_legend()]
        assert len(legends) == 1
        boxes = [ax.get_window_extent(renderer) for ax in getattr(axes, "flat", [axes]) if ax.axison]
        assert not any(_overlaps(legends[0].get_window_extent(renderer), box) for box in boxes)


def test_aux_losses_get_an_axis_of_their_own(tmp_path, monkeypatch):
    rows = [{"kind": "train", "step": s, "contrastive_loss": 3.0 - 0.01 * s, "total_loss": 3.05 - 0.01 * s,
             "importance_loss": 0.002 + 0.0001 * s, "global_entropy_text_loss": 0.0} for s in range(10, 60, 10)]
    figures = _figures(monkeypatch)
    assert plots.plot_training_curves(rows, tmp_path / "curves.png").is_file()
    axes = figures[0][1].flat
    labels = [[line.get_label() for line in ax.get_lines()] for ax in axes]
    assert labels == [["contrastive_loss", "total_loss"], ["global_entropy_text_loss", "importance_loss"]]
    assert axes[1].get_ylim()[1] < 0.1  # scaled to the aux terms, not to a loss of 3
