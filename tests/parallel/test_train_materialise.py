"""The training loop builds its model on the meta device and fills it by replaying the constructor a block at a time
(limoe.parallel.materialise): the weights, and the RNG left behind, are exactly `build_model`'s; the replay never holds
two blocks. The sharded strategies fill their shards the same way (tests/parallel/test_train_fsdp.py: their first losses
equal one process's)."""

import weakref

import pytest
import torch

from limoe.model import block as block_module
from limoe.model.registry import build_model, get_config
from limoe.parallel.materialise import build_for
from limoe.parallel.strategy import Strategy
from limoe.parallel.world import World

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, overrides", [
    ("limoe-tiny", {}),
    ("limoe-tiny", {"paired_init": True}),
    ("limoe-tiny", {"moe": {"num_experts": 4, "router": "soft"}, "logit_bias_init": -10.0}),
    ("limoe-tiny", {"moe": {"num_experts": 4, "router": "expert_choice"}, "image_pool": "mean"}),
    ("dense-tiny", {}),
    ("two-tower-tiny", {"moe_layers": "every:2"}),
])
def test_materialised_model_is_build_model_bit_for_bit(name, overrides):
    config = get_config(name, **overrides)
    torch.manual_seed(3)
    built = build_model(config)
    after_build = torch.get_rng_state()
    torch.manual_seed(3)
    filled = build_for(Strategy(World(0, 1), CPU), config, CPU)
    assert torch.equal(torch.get_rng_state(), after_build)  # data order and router noise draw the same numbers
    mine, theirs = filled.state_dict(), built.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key].device == CPU and torch.equal(mine[key], value), key


def test_the_replay_holds_one_block_at_a_time(monkeypatch):
    real_init, made = block_module.Block.__init__, []

    def init(self, *args, **kwargs):
        replayed = [b for b, on_meta in ((ref(), meta) for ref, meta in made) if b is not None and not on_meta]
        assert all(next(b.parameters()).is_meta for b in replayed), "an earlier block is still held"
        real_init(self, *args, **kwargs)
        made.append((weakref.ref(self), next(self.parameters()).is_meta))

    monkeypatch.setattr(block_module.Block, "__init__", init)
    config = get_config("limoe-tiny")
    build_for(Strategy(World(0, 1), CPU), config, CPU)
    assert sum(not meta for _, meta in made) == config.depth  # the replay built every block, each in turn
