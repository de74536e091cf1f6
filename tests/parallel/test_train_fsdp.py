"""FSDP2, FSDP2 + expert parallelism and expert parallelism on 2 and 4 gloo ranks train exactly as one process
does on the global batch, and their checkpoints resume under another layout (another number of ranks, with or
without FSDP or EP) with the same losses."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from limoe.train import train
from limoe.train.config import apply_overrides

from _train_ddp_worker import tracked_run, train_loop_ep
from _train_utils import tiny_config

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path, cache, *sets: str, steps: int = STEPS):
    # Without router noise (each rank draws its own) and with routing groups of 4 pairs (so 4 ranks of 4 pairs
    # route the groups one process routes), N ranks' mean loss is exactly the one-process loss of the global batch.
    cfg = tiny_config(path, cache, steps=steps, checkpoint_interval=0)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    noise = [] if "moe.router=soft" in sets else ["moe.noise_std=0"]  # Soft MoE has no router noise to turn off
    apply_overrides(cfg, [*noise, "moe.group_size=4", *sets])
    return cfg


def _run(cfg, ranks: int, resume=None, stop_after=None) -> list[float]:
    """Every step's loss, averaged over the ranks."""
    mp.spawn(train_loop_ep, args=(ranks, _free_port(), cfg.to_json(), resume, stop_after), nprocs=ranks, join=True)
    per_rank = [json.loads((Path(cfg.run_dir) / f"rank{r}.json").read_text())["losses"] for r in range(ranks)]
    return [sum(step) / ranks for step in zip(*per_rank)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return root, train(_config(root / "one", root / "cache"), progress=False).losses


@pytest.mark.parametrize("ranks, sets", [
    (2, ("dist.fsdp=true", "activation_checkpointing=true")),
    (2, ("dist.fsdp=true", "dist.expert_parallel=2")),
    (4, ("dist.expert_parallel=2",)),
], ids=["fsdp-2-ranks-recompute", "fsdp-ep2-2-ranks", "ep2-4-ranks"])
def test_sharded_training_equals_one_process(one_process, tmp_path, ranks, sets):
    root, single = one_process
    losses = _run(_config(tmp_path, root / "cache", *sets), ranks)
    assert len(losses) == STEPS
    assert losses == pytest.approx(single, abs=1e-5)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_the_other_routers_train_sharded_as_one_process(one_process, tmp_path, router):
    # Both fill the same [E, C, d] buffers the EP exchange moves (Soft MoE: its slots). FSDP: Soft MoE's router
    # scale is a 0-dim parameter inside a block, which FSDP2 cannot shard.
    root, _ = one_process
    single = train(_config(tmp_path / "one", root / "cache", f"moe.router={router}"), progress=False).losses
    for name, sets in [("fsdp", ("dist.fsdp=true",)), ("ep", ("dist.expert_parallel=2",))]:
        losses = _run(_config(tmp_path / name, root / "cache", f"moe.router={router}", *sets), 2)
        assert losses == pytest.approx(single, abs=1e-5), name


def test_fsdp_ep_checkpoint_resumes_under_other_layouts(one_process, tmp_path):
    # FSDP over 4 ranks with experts split in 2 (each EP shard sharded again over 2 ranks) saves after 2 steps;
    # the run resumes on 2 ranks with FSDP alone, and in one process, each continuing exactly.
    root, single = one_process
    four = _config(tmp_path / "four", root / "cache", "dist.fsdp=true", "dist.expert_parallel=2")
    assert _run(four, 4, stop_after=2) == pytest.approx(single[:2], abs=1e-5)
    checkpoint = str(Path(four.run_dir) / "checkpoints" / "step_00000002")
    # Sharded: each rank wrote its own shard file, none of them the whole model.
    files = sorted((Path(checkpoint) / "sharded").glob("*.safetensors"))
    assert len(files) == 4 and not (Path(checkpoint) / "model.safetensors").exists()
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) < 0.5 * sum(sizes)
    for name, ranks, sets in [("two", 2, ("dist.fsdp=true",)), ("one", 1, ())]:
        cfg = _config(tmp_path / name, root / "cache", *sets)
        cfg.run_dir = four.run_dir  # the same run, continued from its step 2 under another layout
        if ranks == 1:
            losses = train(cfg, resume=checkpoint, progress=False).losses
        else:
            losses = _run(cfg, ranks, resume=checkpoint)
        assert losses == pytest.approx(single[2:], abs=1e-5), name


def test_sharded_checkpoint_loads_in_one_process_and_exports(one_process, tmp_path):
    from limoe import checkpoint as ckpt
    from limoe import load_checkpoint
    from limoe.cli import main

    root, _ = one_process
    cfg = _config(tmp_path / "run", root / "cache", "dist.fsdp=true", "dist.expert_parallel=2", steps=2)
    _run(cfg, 2)
    path = ckpt.list_checkpoints(cfg.run_dir)[-1]
    model, _, _ = load_checkpoint(path)  # what limoe eval, classify, embed and analyze call
    assert main(["export", str(path), str(tmp_path / "single")]) == 0
    exported, _, _ = load_checkpoint(tmp_path / "single")
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    state, tensors = ckpt.read_state(tmp_path / "single")
    assert state["step"] == 2 and any(k.startswith("state.") for k in tensors)  # AdamW moments came along
    assert main(["export", str(tmp_path / "single"), str(tmp_path / "again")]) == 2  # not sharded: one line

    # Damage is one line, as for single-folder checkpoints: a truncated shard, then a missing index.
    shard = sorted((path / "sharded").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="damaged shard") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    (path / "sharded" / "index.json").unlink()
    assert ckpt.list_checkpoints(cfg.run_dir, damaged=True) == [path]
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("sets", [("dist.expert_parallel=2",), ("dist.fsdp=true", "dist.expert_parallel=2")],
                         ids=["ep2", "fsdp-ep2"])
def test_sharded_runs_never_hold_a_whole_expert_tensor(one_process, tmp_path, sets):
    # Once the model is sharded, training, evaluating (every rank on its shard), saving (every rank its shard) and
    # resuming never create a whole [E, d, h] expert tensor on any rank, as gathering them would. The evaluation
    # gives the one-process metrics.
    root, _ = one_process
    cfg = _config(tmp_path / "run", root / "cache", *sets, "eval.interval=1", steps=3)
    cfg.eval.zero_shot = cfg.eval.retrieval = True
    mp.spawn(tracked_run, args=(2, _free_port(), cfg.to_json(), str(tmp_path)), nprocs=2, join=True)
    model = cfg.model_config()
    experts, d, h = model.moe_config().num_experts, model.width, model.mlp_dim
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}-shapes.json").read_text())
        shapes = {tuple(s) for s in record["shapes"]}
        assert (experts // 2, d, h) in shapes  # the tracker sees this rank's experts at work
        assert not shapes & {(experts, d, h), (experts, h, d)}, f"rank {rank} held whole expert tensors"
    one = _config(tmp_path / "one", root / "cache", "eval.interval=1", steps=3)
    one.eval.zero_shot = one.eval.retrieval = True
    held_out = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith("train/")}  # not rank 0's
    single = held_out(train(one, progress=False).metrics)
    metrics = held_out(json.loads((tmp_path / "rank0-shapes.json").read_text())["metrics"])
    assert "zero_shot/top1" in single and metrics == pytest.approx(single, abs=1e-6)


def test_single_folder_checkpoint_resumes_sharded(one_process, tmp_path):
    # A one-process run's checkpoint (model.safetensors) continues under EP 2 and under FSDP + EP 2: each rank takes
    # its share of the weights and AdamW moments, and the losses go on as the one-process run's.
    root, single = one_process
    first = _config(tmp_path / "first", root / "cache")
    assert train(first, stop_after=2, progress=False).losses == pytest.approx(single[:2], abs=1e-6)
    checkpoint = Path(first.run_dir) / "checkpoints" / "step_00000002"
    assert (checkpoint / "model.safetensors").exists()
    for name, sets in [("ep", ("dist.expert_parallel=2",)), ("fsdp-ep", ("dist.fsdp=true", "dist.expert_parallel=2"))]:
        cfg = _config(tmp_path / name, root / "cache", *sets)
        cfg.run_dir = first.run_dir
        assert _run(cfg, 2, resume=str(checkpoint)) == pytest.approx(single[2:], abs=1e-5), name
