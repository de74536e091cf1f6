"""A damaged sharded checkpoint (FSDP + EP on 2 gloo ranks) is one line everywhere it is read: on resume under
the ranks (a NaN shard is refused there, not trained on until the loss is NaN), in `export` and `eval`, and a
save that fails is one line too, not every rank's traceback."""

import json
import socket
import struct

import pytest
import torch
import torch.multiprocessing as mp

from limoe import checkpoint as ckpt
from limoe import load_checkpoint
from limoe.cli import main
from limoe.train.config import apply_overrides

from _train_ddp_worker import cli_rank, train_loop_ep
from _train_utils import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sharded(tmp_path):
    """A 2-step FSDP + EP 2 run on 2 ranks: its config file and its sharded checkpoint."""
    cfg = tiny_config(tmp_path, tmp_path / "cache", steps=2, checkpoint_interval=0)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    apply_overrides(cfg, ["moe.group_size=4", "dist.fsdp=true", "dist.expert_parallel=2"])
    mp.spawn(train_loop_ep, args=(2, _free_port(), cfg.to_json(), None, None), nprocs=2, join=True)
    (tmp_path / "config.json").write_text(cfg.to_json())
    return cfg, ckpt.list_checkpoints(cfg.run_dir)[-1]


def _resume_on_two_ranks(tmp_path, cfg) -> list[dict]:
    argv = ["train", "--config", str(tmp_path / "config.json"), "--resume", "latest", "--steps", "4",
            "--no-progress"]
    mp.spawn(cli_rank, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _fill_with_nan(shard, prefix="model."):
    """Overwrite one float32 tensor of a DCP safetensors shard with NaN, in place (the header stays valid)."""
    data = bytearray(shard.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    name, entry = next((k, v) for k, v in header.items() if k.startswith(prefix) and v["dtype"] == "F32")
    start, end = (8 + size + offset for offset in entry["data_offsets"])
    data[start:end] = struct.pack("<f", float("nan")) * ((end - start) // 4)
    shard.write_bytes(bytes(data))
    return name


@pytest.mark.slow
def test_a_nan_shard_is_refused_on_resume_by_export_and_by_eval(sharded, tmp_path, capsys):
    cfg, path = sharded
    _fill_with_nan(sorted((path / "sharded").glob("*.safetensors"))[0])
    for rank in _resume_on_two_ranks(tmp_path, cfg):
        assert rank["code"] == 2 and "Traceback" not in rank["err"], rank
        assert rank["err"].strip().splitlines()[-1].startswith(f"limoe: error: {path}: non-finite values"), rank
    assert ckpt.list_checkpoints(cfg.run_dir)[-1] == path  # nothing trained on from it
    assert main(["export", str(path), str(tmp_path / "single")]) == 2
    assert "non-finite values" in capsys.readouterr().err and not (tmp_path / "single").exists()
    with pytest.raises(ckpt.CheckpointError, match="non-finite values"):
        load_checkpoint(path)  # what eval, classify, embed and analyze call


@pytest.mark.slow
def test_a_truncated_shard_on_resume_is_one_line_on_every_rank(sharded, tmp_path):
    cfg, path = sharded
    shard = sorted((path / "sharded").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:200])
    for rank in _resume_on_two_ranks(tmp_path, cfg):
        assert rank["code"] == 2 and "Traceback" not in rank["err"], rank
        last = rank["err"].strip().splitlines()[-1]
        assert "damaged shard" in last and "truncated" in last, rank


@pytest.mark.slow
def test_weights_without_the_optimizer_order_still_load_and_export_says_why(sharded, tmp_path, capsys):
    _, path = sharded
    state = json.loads((path / "state.json").read_text())
    del state["optimizer_params"]
    (path / "state.json").write_text(json.dumps(state))
    model, _, _ = load_checkpoint(path)  # eval and embed need the weights alone
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert main(["export", str(path), str(tmp_path / "single")]) == 2
    assert "no optimizer_params" in capsys.readouterr().err


def test_a_failed_sharded_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from limoe.checkpoint import sharded as checkpoint_sharded

    def full_disk(*args, **kwargs):
        import traceback

        error = OSError(28, "No space left on device")
        raise CheckpointException("save failed", {0: (error, traceback.extract_stack())})  # as DCP wraps them

    monkeypatch.setattr(checkpoint_sharded.dcp, "save", full_disk)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"cannot save .*step_00000003") as e:
            checkpoint_sharded.save(tmp_path, 3, {"w": torch.ones(2)}, [], {}, None, {}, "{}", None, None, rank=0)
        assert "\n" not in str(e.value)
    finally:
        dist.destroy_process_group()
    assert [p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()] == []
