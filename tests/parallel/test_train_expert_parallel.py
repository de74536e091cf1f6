"""Expert parallelism in the training loop, on 2 gloo ranks: same losses as data parallelism, portable
checkpoints, exact resume, and one-line config errors."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from limoe.train.config import ConfigError, apply_overrides

from _train_ddp_worker import ep_embeddings, fixed_inputs, train_loop_ep
from _train_utils import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, cache, ep: int, steps: int = 3, **kw):
    cfg = tiny_config(tmp_path, cache, steps=steps, checkpoint_interval=0, **kw)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    apply_overrides(cfg, [f"dist.expert_parallel={ep}"])
    return cfg


def _run(cfg, resume=None, stop_after=None) -> list[list[float]]:
    mp.spawn(train_loop_ep, args=(2, _free_port(), cfg.to_json(), resume, stop_after), nprocs=2, join=True)
    return [json.loads((Path(cfg.run_dir) / f"rank{r}.json").read_text())["losses"] for r in range(2)]


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    """3 steps of limoe-tiny with expert_parallel=2 and, on the same 2 ranks and seed, data-parallel."""
    root = tmp_path_factory.mktemp("ep")
    cache = root / "cache"
    ep = _config(root / "ep", cache, 2)
    ep_losses = _run(ep)
    dp_losses = _run(_config(root / "dp", cache, 1))
    return root, ep, ep_losses, dp_losses


def test_expert_parallel_losses_equal_data_parallel(ep_run):
    _, _, ep_losses, dp_losses = ep_run
    assert len(ep_losses[0]) == 3
    for ep, dp in zip(ep_losses, dp_losses):  # each rank's loss of every step
        assert ep == pytest.approx(dp, abs=1e-5)


def test_expert_parallel_limoe_equals_one_process(ep_run, tmp_path):
    # Without router noise (which each rank draws for its own tokens), 2 expert-parallel ranks route exactly the
    # routing groups one process routes: per step, the mean of their losses is the one-process loss.
    from limoe.train import train

    root = ep_run[0]
    cfg = _config(tmp_path / "ep", root / "cache", 2)
    cfg.moe["noise_std"] = 0.0
    ranks = _run(cfg)
    single = _config(tmp_path / "one", root / "cache", 1)
    single.moe["noise_std"] = 0.0
    losses = train(single, progress=False).losses
    assert [(a + b) / 2 for a, b in zip(*ranks)] == pytest.approx(losses, abs=1e-5)


def test_expert_parallel_checkpoint_loads_in_one_process(ep_run, tmp_path):
    from limoe import checkpoint as ckpt
    from limoe import load_checkpoint

    _, cfg, _, _ = ep_run
    path = ckpt.list_checkpoints(cfg.run_dir)[-1]
    model, _, loaded_cfg = load_checkpoint(path)  # full expert tensors: a single-process model loads them
    assert loaded_cfg.dist.expert_parallel == 2
    images, ids = fixed_inputs(loaded_cfg)
    with torch.no_grad():
        single = {"image": model.encode_image(images), "text": model.encode_text(ids)}
    out = tmp_path / "ep_embeds.pt"
    mp.spawn(ep_embeddings, args=(2, _free_port(), str(path), 2, str(out)), nprocs=2, join=True)
    ep = torch.load(out)  # written by the test's own worker
    for key in ("image", "text"):
        torch.testing.assert_close(ep[key], single[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_expert_parallel_resume_is_exact(ep_run, tmp_path):
    root, _, _, _ = ep_run
    straight = _run(_config(tmp_path / "straight", root / "cache", 2, steps=4))
    cfg = _config(tmp_path / "split", root / "cache", 2, steps=4)
    first = _run(cfg, stop_after=2)
    second = _run(cfg, resume="latest")
    for r in range(2):
        assert first[r] + second[r] == pytest.approx(straight[r], abs=1e-6)


def test_expert_parallel_config_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"dist.expert_parallel=3 must divide the number of experts"):
        apply_overrides(cfg, ["dist.expert_parallel=3"]).validate()
    with pytest.raises(ConfigError, match=r"dist.expert_parallel must be >= 1"):
        apply_overrides(cfg, ["dist.expert_parallel=0"]).validate()
    with pytest.raises(ConfigError, match=r"needs moe.expert_backend 'auto' or 'bmm'"):
        apply_overrides(tiny_config(tmp_path), ["dist.expert_parallel=2", "moe.expert_backend=grouped_mm"]).validate()
    with pytest.raises(ConfigError, match=r"needs moe.capacity_tokens='all'"):
        apply_overrides(tiny_config(tmp_path), ["dist.expert_parallel=2", "moe.capacity_tokens=valid"]).validate()
    dense = tiny_config(tmp_path, model="dense-tiny")
    with pytest.raises(ConfigError, match=r"needs a model with MoE layers"):
        apply_overrides(dense, ["dist.expert_parallel=2"]).validate()
    cfg = apply_overrides(tiny_config(tmp_path), ["dist.expert_parallel=2"]).validate()
    with pytest.raises(ConfigError, match=r"needs a world size that is a multiple of it .* world size is 1"):
        cfg.check_world(1)


def test_cli_prints_one_line_for_a_bad_expert_parallel_size(tmp_path, capsys):
    from limoe.cli import main

    code = main(["train", "--set", "dist.expert_parallel=3", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "dist.expert_parallel=3" in err
