"""Worker processes of the 2-rank gloo tests (a module, so that spawned processes can import it)."""

import json
import os

import torch
import torch.distributed as dist


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def same_global_batch(rank: int, world: int, port: int, out_dir: str) -> None:
    """One step of dense-tiny on this rank's half of a fixed global batch: loss and (DDP-averaged) gradients."""
    _init(rank, world, port)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from limoe.train.config import TrainConfig
        from _train_global_batch import global_batch, one_step

        cfg = TrainConfig(model="dense-tiny")
        batch = global_batch()
        n = len(batch) // world
        local = batch.slice(rank * n, (rank + 1) * n)
        loss, grads = one_step(cfg, local, wrap=DistributedDataParallel)
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "ddp.pt"))
            with open(os.path.join(out_dir, "ddp.json"), "w") as f:
                json.dump(losses, f)
        dist.barrier()  # leave together: tearing gloo down under a busy peer can abort it
    finally:
        dist.destroy_process_group()


def train_loop(rank: int, world: int, port: int, config_json: str) -> None:
    _init(rank, world, port)
    from limoe.train import TrainConfig, train

    try:
        result = train(TrainConfig.from_dict(json.loads(config_json)), progress=False)
        with open(os.path.join(json.loads(config_json)["run_dir"], f"rank{rank}.json"), "w") as f:
            json.dump({"losses": result.losses, "step": result.step, "metrics": result.metrics}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
