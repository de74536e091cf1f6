"""`limoe memory`: parameters per rank as the strategies really shard them, activations from a meta-device
forward, and the command's table."""

import json
import socket

import pytest
import torch.multiprocessing as mp

from limoe.cli import main
from limoe.model.registry import get_config, get_model_info
from limoe.train.config import apply_overrides
from limoe.train.sizing import GIB, Layout, activation_bytes, estimate, meta_model, parameter_split

from _train_ddp_worker import shard_sizes
from _train_utils import tiny_config


def test_parameter_split_of_h14_is_the_papers_layout():
    config = get_config("limoe-h14")
    expert, other = parameter_split(meta_model(config))
    d, h = config.width, config.mlp_dim
    assert expert == 12 * 32 * (2 * d * h + h + d)  # 32 experts in 12 MoE layers
    assert expert + other == get_model_info("limoe-h14").total_params
    assert 5.5e9 < expert + other < 5.7e9  # the paper's 5.6B


def test_params_per_rank_are_what_the_strategies_leave_on_each_rank(tmp_path):
    cfg = tiny_config(tmp_path)
    apply_overrides(cfg, ["dist.expert_parallel=2"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(shard_sizes, args=(4, port, str(tmp_path), cfg.to_json()), nprocs=4, join=True)
    held = [json.loads((tmp_path / f"rank{r}-sizes.json").read_text()) for r in range(4)]
    model = meta_model(cfg.model_config())
    expert, other = parameter_split(model)
    scalars = sum(1 for p in model.parameters() if p.dim() == 0)  # FSDP leaves them replicated
    # EP alone: every rank holds half the experts and all the rest, exactly.
    assert {h["ep"] for h in held} == {Layout(4, 2).params_per_rank(expert, other)}
    # FSDP + EP: the 4 ranks' shards hold the model once; FSDP pads uneven shards, so the largest share is the
    # estimate's up to that rounding.
    assert sum(h["fsdp"] for h in held) == expert + other + 3 * scalars
    estimate_fsdp = Layout(4, 2, fsdp=True).params_per_rank(expert, other)
    assert estimate_fsdp <= max(h["fsdp"] for h in held) <= 1.1 * estimate_fsdp


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing_and_bf16():
    model = meta_model(get_config("limoe-tiny"))
    one, two = activation_bytes(model, 8), activation_bytes(model, 16)
    assert two == pytest.approx(2 * one, rel=0.05)
    assert activation_bytes(model, 8, checkpointing=True) < 0.5 * one
    assert activation_bytes(model, 8, bf16=True) == one // 2


def test_layouts_divide_the_states():
    single = estimate("limoe-b16", Layout(1), 4)
    sharded = estimate("limoe-b16", Layout(8, 8, fsdp=True), 4)
    assert sharded.params == pytest.approx(single.params / 8, rel=0.01)
    assert sharded.activation_bytes == single.activation_bytes  # per rank: the same micro-batch
    assert single.states_gib == pytest.approx(single.params * 16 / GIB)


def test_memory_command_prints_the_table_and_refuses_bad_layouts(capsys):
    assert main(["memory", "--model", "limoe-b16", "--ranks", "2", "8", "--expert-parallel", "2", "--fsdp",
                 "--batch-per-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "| limoe-b16 | 2 ranks, EP 2, FSDP | 2 |" in out and "| limoe-b16 | 8 ranks, EP 2, FSDP | 2 |" in out
    assert main(["memory", "--model", "limoe-b16", "--ranks", "6", "--expert-parallel", "4"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main(["memory", "--model", "dense-b16", "--expert-parallel", "2", "--ranks", "2"]) == 2
    assert "no" in capsys.readouterr().err
    assert main(["memory", "--model", "limoe-x99"]) == 2


@pytest.mark.parametrize("override", ["model.depth=100000", "data.image_size=100000", "moe.num_experts=1000000",
                                      "data.vocab_size=1000000000", "data.context_length=100000000"])
def test_an_impossible_size_is_refused_at_once_before_anything_is_written(tmp_path, override):
    """These hung in the model build, aborted in the tokenizer's allocator or ignored signals while allocating."""
    import time

    from limoe.train import TrainingError, train

    cfg = tiny_config(tmp_path)
    apply_overrides(cfg, [override])
    start = time.perf_counter()
    with pytest.raises(TrainingError, match=r"limoe-tiny: the model cannot fit: .* parameters need .* against "):
        train(cfg, progress=False)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists()


def test_the_fit_check_passes_every_preset_that_trains_here(tmp_path):
    import torch

    from limoe.train.sizing import check_fits

    for model in ("limoe-tiny", "dense-tiny", "two-tower-tiny", "limoe-s32"):
        check_fits(get_config(model), Layout(), 128, torch.device("cpu"))
    # A model only many ranks hold: refused on one, accepted when FSDP and EP share it out over 64.
    with pytest.raises(ValueError, match="cannot fit"):
        check_fits(get_config("limoe-h14"), Layout(), 1, torch.device("cpu"))
    check_fits(get_config("limoe-h14"), Layout(64, 8, fsdp=True), 1, torch.device("cpu"))
