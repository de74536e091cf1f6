"""What `limoe eval`, `classify`, `embed`, `data info`, `memory` and every --help say: which checkpoint and which
data, progress while it runs, readable numbers, and a refusal instead of a silent wrong answer."""

import argparse
import json
import shutil

import numpy as np
import pytest

from limoe.cli import build_parser, main
from limoe.data.builtin import dataset_dir
from limoe.jobs import JobError, evaluation_plan, metrics_table
from limoe.train import train
from limoe.train.config import TrainConfig
from limoe.train.data import builtin_config

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    cfg = tiny_config(tmp, steps=2)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    return train(cfg, progress=False).checkpoint, cfg


def _as_csv_run(checkpoint, folder):
    """A copy of `checkpoint` whose config says it trained on a CSV of the user's (the weights do not matter)."""
    copy = folder / "csv-run" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"].update(source="csv", train="my-pairs.csv")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _one_error_line(err: str, *contains: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("limoe: error:"), lines
    assert all(c in lines[0] for c in contains), lines


def test_eval_names_checkpoint_and_data_first_and_shows_progress(run, capsys):
    checkpoint, _ = run
    assert main(["eval", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    first, *table = captured.out.splitlines()
    assert first == (f"checkpoint: {checkpoint} (step 2): evaluating zero-shot on the held-out concepts of the "
                     f"built-in OpenMoji set, retrieval on the test pairs of the built-in OpenMoji set")
    progress = captured.err.splitlines()
    assert any(line.startswith("limoe eval: [1/2] zero-shot: ") and "classes" in line for line in progress)
    assert any(line.startswith("limoe eval: [2/2] retrieval: ") and "pairs" in line for line in progress)
    rows = {line.split()[0]: line.split()[1:] for line in table[1:] if line.strip()}
    assert rows["zero_shot/top1"][0].endswith("%") and rows["zero_shot/top1"][1].endswith("%")  # value, chance
    loss = rows["retrieval/contrastive_loss"]
    assert len(loss) == 1 and not loss[0].endswith("%") and float(loss[0]) > 0.5  # nats, not a share x 100


def test_metrics_table_prints_shares_as_percentages_and_losses_as_numbers():
    table = metrics_table({"zero_shot/top1": 0.0383, "retrieval/contrastive_loss": 4.5123},
                          {"zero_shot/top1": 1 / 1093})
    assert table.splitlines()[1].split() == ["zero_shot/top1", "3.83%", "0.09%"]
    assert table.splitlines()[2].split() == ["retrieval/contrastive_loss", "4.512"]


def test_eval_of_a_run_on_its_own_data_refuses_without_data_to_score(run, tmp_path, capsys):
    csv_run = _as_csv_run(run[0], tmp_path)
    assert main(["eval", str(csv_run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before anything was scored or announced
    _one_error_line(captured.err, "data.source=csv", "--zero-shot", "--retrieval")
    cfg = TrainConfig()
    cfg.data.source, cfg.data.train = "wds", "shards-{000..009}.tar"
    with pytest.raises(JobError, match="data.source=wds"):
        evaluation_plan(cfg)
    cfg.eval.retrieval_csv = "val.csv"
    with pytest.raises(JobError, match="its training evaluated on --retrieval val.csv"):
        evaluation_plan(cfg)


def test_eval_of_a_run_on_its_own_data_scores_only_what_is_given(run, tmp_path, capsys):
    csv_run = _as_csv_run(run[0], tmp_path)
    pairs = dataset_dir(builtin_config(run[1])) / "test.csv"
    out = tmp_path / "metrics.json"
    assert main(["eval", str(csv_run), "--retrieval", str(pairs), "-o", str(out)]) == 0
    assert f"evaluating retrieval on {pairs}" in capsys.readouterr().out.splitlines()[0]
    assert all(key.startswith("retrieval/") for key in json.loads(out.read_text()))  # no built-in zero-shot


def test_classify_and_embed_say_which_checkpoint(run, tmp_path, capsys):
    checkpoint, cfg = run
    image = sorted((dataset_dir(builtin_config(cfg)) / "images").iterdir())[0]
    assert main(["classify", str(checkpoint.parent.parent), str(image), "--labels", "cat,dog"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"checkpoint: {checkpoint} (step 2)"  # the run's latest
    assert main(["embed", str(checkpoint), "--text", "a cat", "-o", str(tmp_path / "z.npy")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {checkpoint} (step 2)" in out and "L2-normalised" in out


def test_embed_refuses_blank_texts_and_records_its_inputs_in_row_order(run, tmp_path, capsys):
    checkpoint, _ = run
    texts = tmp_path / "texts.txt"
    texts.write_text("a red heart\n\nthumbs up\ncat\n")
    assert main(["embed", str(checkpoint), "--texts-file", str(texts), "-o", str(tmp_path / "t.npy")]) == 2
    _one_error_line(capsys.readouterr().err, f"{texts}: line 2 is blank")
    assert main(["embed", str(checkpoint), "--text", "a", "", "c", "-o", str(tmp_path / "t.npy")]) == 2
    _one_error_line(capsys.readouterr().err, "text 2 of 3 is empty")
    assert not (tmp_path / "t.npy").exists()

    texts.write_text("a red heart\nthumbs up\ncat\n\n\n")  # blank lines at the end are no texts
    assert main(["embed", str(checkpoint), "--text", "dog", "--texts-file", str(texts), "-o",
                 str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape[0] == 4
    inputs = json.loads((tmp_path / "t.inputs.json").read_text())
    assert inputs["items"] == ["dog", "a red heart", "thumbs up", "cat"] and inputs["normalized"] == "l2"
    assert main(["embed", str(checkpoint), "--texts-file", str(texts), "-o", str(tmp_path / "t.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "np") as f:
        meta = f.metadata()
    assert json.loads(meta["items"]) == ["a red heart", "thumbs up", "cat"] and meta["kind"] == "text"


def test_memory_of_a_small_model_prints_readable_units(capsys):
    assert main(["memory", "--model", "limoe-tiny", "--ranks", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "1.2 M"  # limoe-tiny's 1.21M parameters, not "0.00 B"
    assert all(c.split()[1] in ("KiB", "MiB") and float(c.split()[0]) > 0 for c in cells[4:6])


def test_every_option_of_these_commands_says_what_it_does():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    undocumented = [(name, action.dest) for name in ("train", "eval", "classify", "embed", "analyze", "data",
                                                     "export", "demo", "memory")
                    for action in commands[name]._actions
                    if action.help is None and not isinstance(action, argparse._HelpAction)]
    assert undocumented == []
    assert "OpenMoji" not in commands["train"].description  # the default run trains on the corpus


def test_outputs_are_checked_before_the_work(run, tmp_path, capsys):
    checkpoint, _ = run
    missing = tmp_path / "no-such-folder" / "m.json"
    for argv, says in ((["eval", str(checkpoint), "-o", str(missing)], "does not exist"),
                       (["eval", str(checkpoint), "-o", str(tmp_path)], "is a folder"),
                       (["embed", str(checkpoint), "--text", "a cat", "-o", str(tmp_path)], "is a folder"),
                       (["embed", str(checkpoint), "--text", "a cat", "-o", str(missing)], "does not exist"),
                       (["analyze", str(checkpoint), "--out", str(tmp_path / "texts.txt" / "report")], "is a file"),
                       (["export", str(checkpoint), str(tmp_path)], "exists")):
        (tmp_path / "texts.txt").write_text("x\n")
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        _one_error_line(captured.err, says)
        assert "evaluating" not in captured.out  # refused before the work, not after it


def test_a_write_error_after_the_work_is_one_line(run, tmp_path, capsys, monkeypatch):
    checkpoint, _ = run

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "z.npy"))

    monkeypatch.setattr("limoe.jobs.embed", full_disk)
    assert main(["embed", str(checkpoint), "--text", "a cat", "-o", str(tmp_path / "z.npy")]) == 2
    _one_error_line(capsys.readouterr().err, f"{tmp_path / 'z.npy'}: No space left on device")


def test_small_inputs_of_classify_and_eval_are_one_line(run, tmp_path, capsys):
    checkpoint, cfg = run
    image = sorted((dataset_dir(builtin_config(cfg)) / "images").iterdir())[0]
    labels = tmp_path / "labels.txt"
    labels.write_bytes("cat\ndog\n".encode("utf-16"))
    assert main(["classify", str(checkpoint), str(image), "--labels", f"@{labels}"]) == 2
    _one_error_line(capsys.readouterr().err, f"{labels}: not UTF-8 text")
    for top in ("0", "-1"):
        with pytest.raises(SystemExit) as stop:
            main(["classify", str(checkpoint), str(image), "--labels", "cat,dog", "--top", top])
        assert stop.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    zero_shot = dataset_dir(builtin_config(cfg)) / "zeroshot"
    templates = tmp_path / "templates.txt"
    for bad in ("a {} of {}", "a {name}", "a { b"):
        templates.write_text(f"a photo of a {{}}.\n{bad}\n")
        assert main(["eval", str(checkpoint), "--zero-shot", str(zero_shot), "--templates", str(templates)]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line "reading the data"
        assert error.startswith("limoe: error:") and "exactly one '{}'" in error and bad in error, error


def test_eval_capacity_factor_sets_every_moe_layer_and_refuses_what_it_cannot_mean(run, tmp_path, capsys,
                                                                                   monkeypatch):
    checkpoint, _ = run
    seen = []
    from limoe.moe import layer as moe_layer

    real = moe_layer.set_eval_capacity_factor
    monkeypatch.setattr(moe_layer, "set_eval_capacity_factor", lambda model, f: seen.append(real(model, f)))
    assert main(["eval", str(checkpoint), "--capacity-factor", "8", "-o", str(tmp_path / "m.json")]) == 0
    assert seen == [2]  # limoe-tiny: MoE in blocks 1 and 3
    assert json.loads((tmp_path / "m.json").read_text())["zero_shot/top1"] >= 0
    capsys.readouterr()
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(SystemExit):
            main(["eval", str(checkpoint), "--capacity-factor", bad])
        assert "--capacity-factor" in capsys.readouterr().err
