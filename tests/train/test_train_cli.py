"""`limoe eval`, `limoe classify`, `limoe embed` and `limoe train` on a checkpoint from a few-step run."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import limoe
from limoe.cli import main
from limoe.data.builtin import dataset_dir
from limoe.train import train
from limoe.train.data import builtin_config

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp, steps=3)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    result = train(cfg, progress=False)
    return result.checkpoint, cfg


@pytest.fixture(scope="module")
def images(run, tmp_path_factory):
    folder = dataset_dir(builtin_config(run[1])) / "images"
    return [str(p) for p in sorted(folder.iterdir())[:2]]


def _one_error_line(capsys, contains: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limoe: error:") and contains in err[0], err


def test_load_checkpoint_api(run):
    model, tokenizer, config = limoe.load_checkpoint(str(run[0]))
    z = model.encode_text(tokenizer(["thumbs up", "red heart"]).ids_BT)
    assert z.shape == (2, model.config.output_dim) and config.steps == 3


def test_classify_prints_labels_per_image(run, images, capsys):
    assert main(["classify", str(run[0]), *images, "--labels", "cat, dog,thumbs up", "--top", "2"]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header == f"checkpoint: {run[0]} (step 3)"  # which checkpoint answered
    assert len(lines) == 2 and lines[0].startswith(images[0]) and lines[0].count("%") == 2


def test_classify_bad_inputs_give_one_line(run, images, tmp_path, capsys):
    assert main(["classify", str(run[0]), str(tmp_path / "missing.png"), "--labels", "cat,dog"]) == 2
    _one_error_line(capsys, "image not found")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    assert main(["classify", str(run[0]), str(corrupt), "--labels", "cat,dog"]) == 2
    _one_error_line(capsys, "cannot read image")
    assert main(["classify", str(run[0]), images[0], "--labels", "cat"]) == 2
    _one_error_line(capsys, "at least two labels")
    assert main(["classify", str(tmp_path / "nope"), images[0], "--labels", "cat,dog"]) == 2
    _one_error_line(capsys, "checkpoint not found")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("a text, not an image")
    assert main(["classify", str(run[0]), str(text_file), "--labels", "cat,dog"]) == 2
    _one_error_line(capsys, "not an image")


def test_eval_defaults_to_the_builtin_held_out_split(run, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run[0].parent.parent), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zero_shot/top1" in text and "retrieval/image_to_text/R@1" in text
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"zero_shot/top1", "zero_shot/top5", "retrieval/text_to_image/R@1"}


def test_eval_on_folders_with_a_linear_probe(run, tmp_path, capsys):
    zs = dataset_dir(builtin_config(run[1])) / "zeroshot"
    folder = tmp_path / "zs"
    shutil.copytree(zs, folder)
    assert main(["eval", str(run[0]), "--zero-shot", str(folder), "--probe-train", str(folder),
                 "--probe-test", str(folder), "--shots", "1"]) == 0
    assert "linear_probe/1shot_accuracy" in capsys.readouterr().out
    assert main(["eval", str(run[0]), "--zero-shot", str(tmp_path / "none")]) == 2
    _one_error_line(capsys, "zero-shot folder not found")
    assert main(["eval", str(run[0]), "--probe-train", str(folder)]) == 2
    _one_error_line(capsys, "needs both")


def test_embed_texts_and_images(run, images, tmp_path, capsys):
    out = tmp_path / "texts.npy"
    assert main(["embed", str(run[0]), "--text", "thumbs up", "--text", "red heart", "-o", str(out)]) == 0
    z = np.load(out)
    assert z.shape == (2, 64) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    out = tmp_path / "images.safetensors"
    assert main(["embed", str(run[0]), "--images", *images, "-o", str(out)]) == 0
    from safetensors.numpy import load_file

    assert load_file(str(out))["embeddings"].shape == (2, 64)
    assert main(["embed", str(run[0]), "--text", "a", "-o", str(tmp_path / "x.pt")]) == 2
    _one_error_line(capsys, ".npy or .safetensors")
    assert main(["embed", str(run[0]), "--text", "a", "--images", *images, "-o", str(out)]) == 2
    _one_error_line(capsys, "either images or texts")


def test_train_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "empty"), "--resume", "latest"]) == 2
    _one_error_line(capsys, "no checkpoint to resume from")


def test_train_refuses_to_overwrite_and_resumes_with_the_runs_config(run, capsys):
    run_dir = run[0].parent.parent
    assert main(["train", "--run-dir", str(run_dir), "--steps", "1"]) == 2
    _one_error_line(capsys, "already has checkpoints: pass --resume latest")
    # the run's own config.json (subset data, no eval) is used; only --steps changes
    assert main(["train", "--run-dir", str(run_dir), "--resume", "latest", "--steps", "4", "--no-progress"]) == 0
    assert "step_00000004" in capsys.readouterr().out


def test_train_with_a_missing_csv_is_one_line(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "data.source=csv",
                 "--set", f"data.train={tmp_path / 'none.csv'}"]) == 2
    _one_error_line(capsys, "CSV file not found")


def test_analyze_a_real_checkpoint(run, tmp_path, capsys):
    checkpoint, cfg = run
    pairs = dataset_dir(builtin_config(cfg)) / "test.csv"
    out = tmp_path / "report"
    assert main(["analyze", str(checkpoint), "--data", str(pairs), "--num-pairs", "16", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["has_moe"] and data["num_pairs"] == 16
    # The run's metrics.jsonl is found from the checkpoint and drawn.
    assert data["training_curves"]["steps"] > 0 and (out / "training_curves.png").is_file()
    for layer in data["layers"]:
        assert layer["modality"]["image"]["tokens"] > 0 and layer["modality"]["text"]["tokens"] > 0


def test_embed_takes_several_texts_after_one_flag(run, tmp_path, capsys):
    out = tmp_path / "texts.npy"
    assert main(["embed", str(run[0]), "--text", "a", "b", "c", "--text", "d", "-o", str(out)]) == 0
    assert np.load(out).shape == (4, 64)


def test_classify_reports_an_unreadable_image_and_classifies_the_rest(run, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    assert main(["classify", str(run[0]), images[0], str(corrupt), images[1], "--labels", "cat,dog"]) == 2
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()[1:]  # after the checkpoint's line
    assert [line.split(":")[0] for line in out] == [images[0], images[1]]
    _one_error_line_in(captured.err, f"cannot read image {corrupt}")


def _one_error_line_in(err: str, contains: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("limoe: error:") and contains in lines[0], lines


def test_eval_says_which_checkpoint_and_step(run, capsys):
    assert main(["eval", str(run[0].parent.parent)]) == 0  # a run folder: its latest (an earlier test extends it)
    first = capsys.readouterr().out.splitlines()[0]
    folder = re.escape(str(run[0].parent))
    match = re.fullmatch(rf"checkpoint: {folder}/step_(\d+) \(step (\d+)\): evaluating .+", first)
    assert match and int(match[1]) == int(match[2]) >= 3, first  # the folder's step is the state's


def test_train_says_where_it_goes_first_and_lists_its_evaluations_at_the_end(run, tmp_path, capsys):
    cfg = tiny_config(tmp_path, run[1].data.cache_dir, steps=4, checkpoint_interval=0)
    cfg.eval.interval = 2
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert main(["train", "--config", str(tmp_path / "config.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.lstrip().startswith("limoe: limoe-tiny") and f"-> {cfg.run_dir}" in out.splitlines()[0]
    table = out[out.index("Held-out evaluations during training"):].splitlines()
    steps = [line.split()[0] for line in table[2:4]]
    assert steps == ["2", "4"] and sum("<- best" in line for line in table) == 1
    assert "checkpoint: " in out and "(step 4)" in out


def test_data_info_says_where_the_data_is(tmp_path, monkeypatch, capsys):
    import limoe.data

    (tmp_path / "manifest.json").write_text(json.dumps({"pairs": {"train": 39, "test": 23},
                                                        "concepts": {"train": 34, "test": 6}}))
    monkeypatch.setattr(limoe.data, "build_builtin_dataset", lambda cfg, force=False: tmp_path)
    assert main(["data", "info", "--dataset", "builtin"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"built-in dataset: {tmp_path}"
    assert [line.split() for line in out.splitlines()[2:5]] == [["train", "test"], ["pairs", "39", "23"],
                                                               ["concepts", "34", "6"]]  # a table, not JSON


def _pairs_csv(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filepath,title"]
    for i in range(n):
        Image.new("RGB", (16, 16), (20 * i, 90, 160)).save(folder / f"{i}.png")
        lines.append(f"{folder}/{i}.png,square number {i}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


@pytest.mark.parametrize("case", ["smaller than one batch", "malformed shard pattern", "no shard matches"])
def test_train_data_that_cannot_give_a_batch_is_one_line(tmp_path, capsys, case):
    source = {"smaller than one batch": ["data.source=csv", f"data.train={_pairs_csv(tmp_path / 'd', 5)}"],
              "malformed shard pattern": ["data.source=wds", f"data.train={tmp_path}/shard-{{000..0.tar"],
              "no shard matches": ["data.source=wds", f"data.train={tmp_path}/none-{{000..003}}.tar"]}[case]
    argv = ["train", "--run-dir", str(tmp_path / "r"), "--set", "data.batch_size=16", "--set", "data.num_workers=0"]
    assert main(argv + [arg for item in source for arg in ("--set", item)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limoe: error:") and "Traceback" not in err[0], err


def test_eval_on_data_without_a_valid_sample_is_one_line(run, tmp_path, capsys):
    (tmp_path / "bad.csv").write_text(f"filepath,title\n{tmp_path}/gone.png,a picture that is not there\n")
    assert main(["eval", str(run[0]), "--retrieval", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    progress = [line for line in err if line.startswith("limoe eval: ")]  # the sets scored before the bad one
    _one_error_line_in("\n".join(line for line in err if line not in progress), "no valid samples")


def test_open_clip_csv_flags_on_train_eval_and_analyze(run, images, tmp_path, capsys):
    """A `;`-separated file with its own column names: train, eval --retrieval and analyze --data read it from
    open_clip's flags; without them each is one line naming the flag that works."""
    rows = "".join(f"{p};an emoji number {i}\n" for i, p in enumerate(images * 4))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image;caption\n" + rows)
    flags = ["--csv-img-key", "image", "--csv-caption-key", "caption", "--csv-separator", "semicolon"]
    checkpoint, cfg = run
    assert main(["eval", str(checkpoint), "--retrieval", str(pairs)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("limoe: error:") and "pass --csv-separator ';'" in error, error
    assert main(["eval", str(checkpoint), "--retrieval", str(pairs), *flags, "-o", str(tmp_path / "m.json")]) == 0
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["retrieval/image_to_text/R@1"] <= 1
    capsys.readouterr()
    assert main(["analyze", str(checkpoint), "--data", str(pairs), *flags, "--num-pairs", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "csv-run"
    args = ["train", "--run-dir", str(run_dir), "--steps", "1", "--set", "data.source=csv", "--set",
            f"data.train={pairs}", "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set",
            "eval.zero_shot=false", "--set", "eval.seen=false", "--set", "eval.retrieval=false", "--set",
            "data.vocab_size=300", "--model", "limoe-tiny", "--set", "moe.group_size=1", "--no-progress"]
    assert main(args) == 2
    _one_error_line(capsys, "--csv-img-key")
    assert main(args + flags) == 0
    saved = json.loads((run_dir / "config.json").read_text())["data"]
    assert (saved["csv_img_key"], saved["csv_caption_key"], saved["csv_separator"]) == ("image", "caption", ";")


def test_a_file_inside_a_checkpoint_stands_for_it(run):
    checkpoint, _ = run
    tokenizer = limoe.get_tokenizer(checkpoint / "tokenizer.json")
    assert tokenizer(["a cat"]).shape == (1, 16)
    model = limoe.create_model(pretrained=checkpoint / "model.safetensors", precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = limoe.create_model(pretrained=checkpoint)
    assert torch.equal(model.logit_scale, reference.logit_scale.to(torch.bfloat16))  # the trained weights, cast
    with pytest.raises(ValueError, match="precision must be one of"):
        limoe.create_model_and_transforms("limoe-tiny", precision="fp8")
    model, _, preprocess = limoe.create_model_and_transforms(pretrained=checkpoint, precision="amp")
    assert next(model.parameters()).dtype == torch.float32


def test_eval_on_shards_with_built_in_names_and_templates(run, tmp_path, capsys):
    from _shards import clip_benchmark_shards

    pattern = clip_benchmark_shards(tmp_path, [(0, b"2"), (1, b"0"), (2, b"1"), (3, b"1")])
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run[0]), "--zero-shot", pattern, "--class-names", "cifar10", "--templates",
                 "openai-cifar", "-o", str(out)]) == 0
    assert f"zero-shot on {pattern}" in capsys.readouterr().out
    assert 0.0 <= json.loads(out.read_text())["zero_shot/top1"] <= 1.0
    assert main(["eval", str(run[0]), "--zero-shot", pattern, "--class-names", "imagenet1k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after the progress line, one error line
    assert err[-1] == ("limoe: error: imagenet1k: no such class-names file, and no built-in one of that name "
                       "(cifar10, cifar100)")
