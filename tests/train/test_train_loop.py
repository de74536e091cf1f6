"""The training loop: exact resume, a non-finite loss stops cleanly, SIGINT saves, accumulation, metrics."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import limoe
from limoe import checkpoint as ckpt
from limoe.train import TrainingError, train

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin")


def _weights(run_dir):
    model, _, _ = limoe.load_checkpoint(str(run_dir))
    return model.state_dict()


@pytest.mark.parametrize("in_memory", [True, False])
def test_resume_is_exact(tmp_path, cache, in_memory):
    # 8 steps straight == 4 steps, stop, resume for 4 more: the stop falls mid-epoch (4-5 batches per epoch).
    straight_cfg = tiny_config(tmp_path / "a", cache, steps=8, checkpoint_interval=0)
    straight_cfg.data.in_memory = in_memory
    straight = train(straight_cfg, progress=False)
    cfg = tiny_config(tmp_path / "b", cache, steps=8, checkpoint_interval=0)
    cfg.data.in_memory = in_memory
    first = train(cfg, stop_after=4, progress=False)
    assert first.step == 4 and first.checkpoint.name == "step_00000004"
    second = train(cfg, resume="latest", progress=False)
    assert second.step == 8
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    state, _ = ckpt.read_state(ckpt.resolve("latest", tmp_path / "b" / "run"))
    assert state["step"] == 8 and state["data"]["0"]["epoch"] >= 1


def test_metrics_file_logs_every_loss_term_and_routing(tmp_path, cache):
    result = train(tiny_config(tmp_path, cache, steps=4), progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == [2, 4]
    for key in ("contrastive_loss", "importance_loss", "load_loss", "local_entropy_text_loss", "total_loss",
                "aux/global_entropy/image", "lr", "pairs_per_s", "grad_norm", "routing/routing_success/image",
                "routing/routing_success/text"):
        assert key in train_lines[-1], key
    final = [m for m in lines if m["kind"] == "final"][0]
    for key in ("zero_shot/top1", "zero_shot/top5", "retrieval/image_to_text/R@1", "train/routing_success/text"):
        assert 0.0 <= final[key] <= 1.0
    assert "held-out concepts top-1" in result.table() and "routing success text" in result.table()
    assert "held-out contrastive loss" in result.table()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["steps"] == 4 and saved["model"] == "limoe-tiny"
    assert len(ckpt.list_checkpoints(tmp_path / "run")) == 2  # keep_last=2 of steps 3 and 4


def test_accumulation_splits_the_batch_and_averages_the_micro_batch_losses(tmp_path, cache):
    # The contrastive loss of a half batch has other negatives than the whole batch, so accumulation cannot equal
    # the whole-batch loss; what it must equal is the mean of the two half-batch losses of the first step.
    from limoe.losses import compute_losses
    from limoe.model.registry import build_model
    from limoe.train.data import DataPosition, make_batches, make_tokenizer

    cfg = tiny_config(tmp_path, cache, steps=1, model="dense-tiny")
    cfg.optim.accumulation = 2
    result = train(cfg, progress=False)

    torch.manual_seed(cfg.seed)  # the loop seeds, then builds the model: same initial weights
    tokenizer = make_tokenizer(cfg)
    model = build_model(cfg.model_config()).train()
    batch = next(iter(make_batches(cfg, tokenizer, 0, 1, DataPosition())))
    half = len(batch) // 2
    losses = [compute_losses(model(batch.images_B3HW[sl], batch.ids_BT[sl], valid_BT=~batch.padding_mask_BT[sl]),
                             cfg.loss)["total_loss"].item() for sl in (slice(0, half), slice(half, 2 * half))]
    assert result.losses[0] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert abs(losses[0] - losses[1]) > 1e-3  # two different halves: averaging is really being checked


def _first_routing(run_dir):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        first = next(row for row in map(json.loads, f) if row["kind"] == "train")
    return {k: v for k, v in first.items() if k.startswith("routing/")}


def test_accumulation_does_not_change_routing(tmp_path, cache):
    # Routing groups of 8 pairs never span micro-batches: the first step's routing (same weights, no router noise)
    # is the same whether its 16 pairs run as one batch or as two micro-batches of 8.
    runs = {}
    for parts in (1, 2):
        cfg = tiny_config(tmp_path / str(parts), cache, steps=1, log_interval=1)
        cfg.moe["noise_std"] = 0.0
        cfg.optim.accumulation = parts
        cfg.eval.zero_shot = cfg.eval.retrieval = False
        train(cfg, progress=False)
        runs[parts] = _first_routing(tmp_path / str(parts) / "run")
    assert runs[1]["routing/routing_success/text"] < 1.0  # some tokens drop, so the grouping is really tested
    assert runs[1] == pytest.approx(runs[2], rel=1e-6)  # counts equal; entropies up to summation order


def test_routing_group_must_divide_the_micro_batch(tmp_path):
    from limoe.train.config import ConfigError

    cfg = tiny_config(tmp_path)
    cfg.optim.accumulation = 4  # 16 pairs in micro-batches of 4: not whole groups of 8
    with pytest.raises(ConfigError, match=r"micro-batches of 4 pairs, not a multiple of moe.group_size=8"):
        cfg.validate()
    cfg.optim.accumulation = 2
    cfg.validate().check_world(1)
    with pytest.raises(ConfigError, match=r"2 ranks x optim.accumulation=2 gives micro-batches of 4 pairs"):
        cfg.check_world(2)
    cfg.moe["group_size"] = 4
    cfg.validate().check_world(2)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=3, debug_nan_at_step=4)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint is .*"
                                            r"step_00000003") as info:
        train(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    limoe.load_checkpoint(str(tmp_path / "run"))


def test_sigint_saves_a_checkpoint_and_exits(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, steps=100_000, checkpoint_interval=0, log_interval=1)
    config_path = tmp_path / "config.json"
    config_path.write_text(cfg.to_json())
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "limoe.cli", "train", "--config", str(config_path),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT received: saved" in out and "Traceback" not in err
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert len(found) == 1
    state, _ = ckpt.read_state(found[0])
    assert state["step"] >= 2
    # and it resumes from there
    cfg.steps = state["step"] + 1
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    assert train(cfg, resume="latest", progress=False).step == state["step"] + 1


def test_tensorboard_is_optional(tmp_path, capsys):
    from limoe.train.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log("train", 1, {"loss": 1.0, "bad": float("nan")})
    logger.close()
    if logger.tb is None:
        assert "TensorBoard is not installed" in capsys.readouterr().out
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] == 1.0 and line["bad"] is None  # NaN is written as null: the file stays valid JSON


def test_skips_are_reported_in_a_run_shorter_than_an_epoch(tmp_path):
    from PIL import Image

    rows = ["filepath,title"]
    for i in range(48):
        if i % 2:  # every other row names a missing image
            rows.append(f"{tmp_path}/missing{i}.png,a missing picture")
            continue
        Image.new("RGB", (16, 16), (5 * i, 80, 120)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path}/{i}.png,a {'red' if i % 4 else 'blue'} square {i}")
    data = "\n".join(rows).encode() + "\n".encode() + f"{tmp_path}/0.png,caf\xe9 latin-1\n".encode("latin-1")
    (tmp_path / "pairs.csv").write_bytes(data)
    cfg = tiny_config(tmp_path, steps=1, log_interval=1)
    cfg.data.source, cfg.data.train = "csv", str(tmp_path / "pairs.csv")
    cfg.data.in_memory, cfg.data.num_workers, cfg.data.batch_size = False, 1, 8
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    with pytest.warns(UserWarning, match="tokenizer training captions: skipped 1"):
        result = train(cfg, progress=False)  # 1 step of 8 pairs: far less than the epoch of 24 good ones
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    data_record = next(r for r in records if r["kind"] == "data")
    assert data_record["tokenizer_skipped/bad_encoding"] == 1
    step_record = next(r for r in records if r["kind"] == "train")
    assert step_record["data/skipped/missing_file"] >= 4 and result.skipped["missing_file"] >= 4


class _FakeWandb:
    """The part of the wandb module the logger uses, recording every call."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logs_the_same_scalars_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    from limoe.train.logger import MetricsLogger

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):  # the second logger stands for a resumed invocation of the same run folder
        logger = MetricsLogger(tmp_path / "my-run", wandb=("proj", {"steps": 3}))
        logger.log("train", 1, {"contrastive_loss": 1.5, "routing/ok": 0.9, "note": "text", "flag": True})
        logger.close()
    (_, first), (_, second) = [c for c in fake.calls if c[0] == "init"]
    assert first == {"project": "proj", "name": "my-run", "id": first["id"], "resume": "allow",
                     "config": {"steps": 3}, "dir": str(tmp_path / "my-run")}
    assert re.fullmatch("[0-9a-f]{12}", first["id"]) and second["id"] == first["id"]  # kept in the run folder
    assert ("log", 1, {"train/contrastive_loss": 1.5, "train/routing/ok": 0.9}) in fake.calls
    assert fake.calls.count(("finish",)) == 2


def test_wandb_without_the_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    from limoe.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "wandb=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'limoe-torch[wandb]'" in err[0], err
    assert not (tmp_path / "r").exists()
