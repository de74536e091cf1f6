"""Worker processes of the 2-rank gloo tests (a module, so that spawned processes can import it)."""

import gc
import json
import os

import torch
import torch.distributed as dist


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def same_global_batch(rank: int, world: int, port: int, out_dir: str, config_json: str) -> None:
    """One step on this rank's half of a fixed global batch: loss and (DDP-averaged) gradients."""
    _init(rank, world, port)
    try:
        from limoe.parallel.world import World
        from limoe.train.config import TrainConfig
        from _train_global_batch import global_batch, one_step

        cfg = TrainConfig.from_dict(json.loads(config_json))
        batch = global_batch()
        n = len(batch) // world
        local = batch.rows(rank * n, (rank + 1) * n)
        loss, grads = one_step(cfg, local, World(rank, world))
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "ddp.pt"))
            with open(os.path.join(out_dir, "ddp.json"), "w") as f:
                json.dump(losses, f)
        # DDP's reducer sits in reference cycles: collect it while the process group is alive. Collected after
        # destroy_process_group (or at exit), its destructor aborted the process now and then (SIGABRT,
        # "terminate called without an active exception").
        gc.collect()
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


def train_loop_ep(rank: int, world: int, port: int, config_json: str, resume=None, stop_after=None) -> None:
    """`train_loop`, and (expert-parallel runs) rank 0 also saves the gathered model's embeddings of a fixed
    batch, computed by the EP model itself (all ranks run it, as EP layers need their whole group)."""
    _init(rank, world, port)
    from limoe.train import TrainConfig, train

    cfg = TrainConfig.from_dict(json.loads(config_json))
    try:
        result = train(cfg, resume=resume, stop_after=stop_after, progress=False)
        with open(os.path.join(cfg.run_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": result.losses, "step": result.step, "metrics": result.metrics}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fixed_inputs(cfg):
    """A fixed batch of 4 random images and token sequences for the model of `cfg` (a TrainConfig)."""
    g = torch.Generator().manual_seed(0)
    size, length = cfg.data.image_size, cfg.data.context_length
    images = torch.randn(4, 3, size, size, generator=g)
    ids = torch.randint(1, 200, (4, length), generator=g)
    return images, ids


def ep_embeddings(rank: int, world: int, port: int, checkpoint: str, ep_size: int, out: str) -> None:
    """Load a checkpoint the way an EP run resumes (this rank's expert slice) and embed `fixed_inputs` with the
    expert-parallel model; rank 0 saves the embeddings."""
    _init(rank, world, port)
    try:
        from limoe import checkpoint as ckpt
        from limoe.model.registry import build_model
        from limoe.moe.parallel import expert_state_keys, shard_state_dict
        from limoe.parallel.expert_parallel import shard_model
        from limoe.train.config import load_config

        cfg = load_config(os.path.join(checkpoint, "config.json"))
        model_cfg = cfg.model_config()
        model = build_model(model_cfg)
        groups = shard_model(model, ep_size, model_cfg.moe_config().num_experts)
        ckpt.load_weights(model, checkpoint, shard_state_dict(ckpt.read_weights(checkpoint),
                                                              expert_state_keys(model), groups.ep_rank, ep_size))
        model.eval()
        images, ids = fixed_inputs(cfg)
        with torch.no_grad():
            embeds = {"image": model.encode_image(images), "text": model.encode_text(ids)}
        if rank == 0:
            torch.save(embeds, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_sizes(rank: int, world: int, port: int, out_dir: str, config_json: str) -> None:
    """Parameters this rank holds after each strategy shards the model of the config: rank{r}-sizes.json."""
    _init(rank, world, port)
    try:
        from torch.distributed.tensor import DTensor

        from limoe.model.registry import build_model
        from limoe.parallel import make_strategy
        from limoe.parallel.world import World
        from limoe.train.config import TrainConfig

        cfg = TrainConfig.from_dict(json.loads(config_json))
        sizes = {}
        for fsdp in (False, True):
            cfg.dist.fsdp = fsdp
            model = build_model(cfg.model_config())
            make_strategy(cfg, World(rank, world), torch.device("cpu")).shard(model)
            local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
            sizes["fsdp" if fsdp else "ep"] = sum(t.numel() for t in local)
        with open(os.path.join(out_dir, f"rank{rank}-sizes.json"), "w") as f:
            json.dump(sizes, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def tracked_run(rank: int, world: int, port: int, config_json: str, out_dir: str) -> None:
    """Train the config until step 2 (evaluating after each step), resume to the end, and record the shape of every
    3-D tensor an op creates once the model is built and sharded (a DTensor: its local part): rank{r}-shapes.json,
    with the final metrics."""
    _init(rank, world, port)
    try:
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from limoe.train import TrainConfig, loop, train

        class Shapes(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta: shapes only, no memory
                        shape = t.to_local().shape if isinstance(t, DTensor) else t.shape
                        if len(shape) == 3:
                            self.seen.add(tuple(shape))
                return out

        tracker, real = Shapes(), loop.make_optimizer

        def make_optimizer_then_track(*args):  # right after the model is built
            optimizer = real(*args)
            tracker.__enter__()
            return optimizer

        loop.make_optimizer = make_optimizer_then_track
        cfg = TrainConfig.from_dict(json.loads(config_json))
        for resume, stop_after in ((None, 2), ("latest", None)):
            try:
                result = train(cfg, resume=resume, stop_after=stop_after, progress=False)
            finally:
                tracker.__exit__(None, None, None)
        with open(os.path.join(out_dir, f"rank{rank}-shapes.json"), "w") as f:
            json.dump({"shapes": sorted(tracker.seen), "metrics": result.metrics}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cli_rank(rank: int, world: int, port: int, argv: list, out_dir: str) -> None:
    """`limoe ARGV` on one rank of a gloo group, as under torchrun: its exit code and stderr go to rank<r>.json."""
    import contextlib
    import io

    _init(rank, world, port)
    from limoe.cli import main

    err, code = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"code": code, "err": err.getvalue()}, f)
        dist.destroy_process_group()
