"""Two gloo processes: the same loss and update as one process on the same global batch; the loop runs."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from limoe.train.config import TrainConfig

from _train_ddp_worker import same_global_batch, train_loop
from _train_global_batch import global_batch, one_step
from _train_utils import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# LIMoE without router noise (each rank draws its own noise): routing groups of 4 pairs never span ranks, so the
# two ranks route exactly the groups one process routes, and aux losses average over the same groups.
MODELS = [("dense-tiny", {}), ("limoe-tiny", {"group_size": 4, "noise_std": 0.0})]


@pytest.mark.parametrize("model, moe", MODELS)
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, model, moe):
    cfg = TrainConfig(model=model, moe=moe)
    mp.spawn(same_global_batch, args=(2, _free_port(), str(tmp_path), cfg.to_json()), nprocs=2, join=True)
    single_loss, single_grads = one_step(cfg, global_batch())
    rank_losses = json.loads((tmp_path / "ddp.json").read_text())
    # each rank scores its own rows against the global batch; their mean is the global-batch loss
    assert sum(rank_losses) / 2 == pytest.approx(single_loss, abs=1e-5)
    ddp = torch.load(tmp_path / "ddp.pt")  # written by the test's own worker
    for name, value in single_grads.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=1e-4, msg=name)


def test_training_loop_under_two_gloo_ranks(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, checkpoint_interval=2)
    cfg.eval.retrieval = False
    mp.spawn(train_loop, args=(2, _free_port(), cfg.to_json()), nprocs=2, join=True)
    results = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["step"] == results[1]["step"] == 3
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    assert "zero_shot/top1" in results[0]["metrics"] and results[1]["metrics"] == {}  # rank 0 evaluates
    from limoe import checkpoint as ckpt

    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]


@pytest.mark.parametrize("model, moe", MODELS)
def test_two_rank_loop_trains_on_the_same_global_batches_as_one_process(tmp_path, model, moe):
    # In-memory data with augmentation: per step, the mean of the two ranks' losses (contrastive and aux) equals
    # the one-process loss.
    from limoe.train import train

    cfg = tiny_config(tmp_path / "two", steps=3, checkpoint_interval=0, model=model, moe=dict(moe))
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    mp.spawn(train_loop, args=(2, _free_port(), cfg.to_json()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / "run" / f"rank{r}.json").read_text())["losses"] for r in range(2)]
    single_cfg = tiny_config(tmp_path / "one", tmp_path / "two" / "cache", steps=3, checkpoint_interval=0,
                             model=model, moe=dict(moe))
    single_cfg.eval.zero_shot = single_cfg.eval.retrieval = False
    single = train(single_cfg, progress=False).losses
    assert [(a + b) / 2 for a, b in zip(*ranks)] == pytest.approx(single, abs=1e-5)
