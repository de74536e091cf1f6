"""Sparse upcycling (limoe.upcycle, `limoe train --init-from`): shared weights copied, every expert its block's
dense MLP, routers fresh; an upcycled MoE layer computes gate x the dense MLP; wrong sources are one line."""

import json

import pytest
import torch

import limoe
from limoe.cli import main
from limoe.model.mlp import Mlp
from limoe.moe.layer import set_eval_capacity_factor
from limoe.train import train
from limoe.upcycle import UpcycleError, upcycle, upcycled_weights

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upcycle")
    cfg = tiny_config(tmp, steps=2)
    cfg.model = "dense-tiny"
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    return train(cfg, progress=False).checkpoint, cfg


def test_shared_weights_are_copied_and_every_expert_is_its_blocks_mlp(dense_run):
    checkpoint, _ = dense_run
    dense = limoe.create_model(pretrained=checkpoint).state_dict()
    torch.manual_seed(0)
    model = upcycle(checkpoint, "limoe-tiny", num_experts=4)
    sparse = model.state_dict()
    assert model.config.moe_config().num_experts == 4
    for key, value in dense.items():
        if key in sparse:
            assert torch.equal(sparse[key], value), key
    for block in (1, 3):  # limoe-tiny's MoE blocks
        prefix = f"encoder.blocks.{block}.mlp."
        for e in range(4):
            assert torch.equal(sparse[prefix + "experts.w_in_Edh"][e], dense[prefix + "fc_in.weight"].t())
            assert torch.equal(sparse[prefix + "experts.b_in_Eh"][e], dense[prefix + "fc_in.bias"])
            assert torch.equal(sparse[prefix + "experts.w_out_Ehd"][e], dense[prefix + "fc_out.weight"].t())
            assert torch.equal(sparse[prefix + "experts.b_out_Ed"][e], dense[prefix + "fc_out.bias"])
    # the routers keep the fresh init of the seed
    torch.manual_seed(0)
    fresh = limoe.create_model("limoe-tiny", **{k: getattr(model.config, k) for k in ("vocab_size", "image_size")},
                               num_experts=4).state_dict()
    assert torch.equal(sparse["encoder.blocks.1.mlp.router_dE"], fresh["encoder.blocks.1.mlp.router_dE"])


def test_an_upcycled_layer_is_its_gate_times_the_dense_mlp(dense_run):
    """With room for every token, all experts equal: a token's output is its top-1 gate times the dense MLP's."""
    checkpoint, _ = dense_run
    model = upcycle(checkpoint, "limoe-tiny").eval()
    set_eval_capacity_factor(model, 8.0)
    dense = limoe.create_model(pretrained=checkpoint).encoder.blocks[1].mlp
    layer = model.encoder.blocks[1].mlp
    assert isinstance(dense, Mlp)
    x_BNd = torch.randn(8, 5, model.config.width)
    with torch.no_grad():
        y_BNd, aux = layer(x_BNd)
        gate_BN = torch.softmax(x_BNd @ layer.router.router_dE, -1).max(-1).values
        assert aux.stats.dropped_M.sum() == 0
        torch.testing.assert_close(y_BNd, gate_BN[..., None] * dense(x_BNd), rtol=1e-5, atol=1e-6)


def test_train_init_from_uses_the_dense_runs_weights_and_tokenizer(dense_run, tmp_path, capsys):
    checkpoint, cfg = dense_run
    run_dir = tmp_path / "upcycled"
    common = ["--set", "data.source=builtin", "--set", "data.max_concepts=40", "--set", "data.batch_size=16",
              "--set", f"data.cache_dir={cfg.data.cache_dir}", "--set", "data.vocab_size=512", "--set",
              "data.num_workers=0", "--set", "eval.zero_shot=false", "--set", "eval.retrieval=false",
              "--set", "data.image_size=32", "--model", "limoe-tiny", "--steps", "1", "--no-progress"]
    assert main(["train", "--run-dir", str(tmp_path / "wide"), "--init-from", str(checkpoint), *common,
                 "--set", "model.width=32", "--set", "model.heads=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another shape (width: 64 there, 32 here" in err[0], err
    assert not (tmp_path / "wide").exists()
    assert main(["train", "--run-dir", str(run_dir), "--init-from", str(checkpoint.parent.parent), *common]) == 0
    assert (run_dir / "tokenizer.json").read_text() == (checkpoint / "tokenizer.json").read_text()
    assert json.loads((run_dir / "config.json").read_text())["init_from"] == str(checkpoint.parent.parent)


def test_sources_that_cannot_start_the_model_are_refused(dense_run, tmp_path):
    checkpoint, _ = dense_run
    dense = limoe.create_model(pretrained=checkpoint).state_dict()
    config = upcycle(checkpoint).config
    with pytest.raises(UpcycleError, match="no encoder.blocks.0.norm1.weight"):
        upcycled_weights({k: v for k, v in dense.items() if k != "encoder.blocks.0.norm1.weight"}, config)
    with pytest.raises(UpcycleError, match="no place for: extra.weight"):
        upcycled_weights({**dense, "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(UpcycleError, match="a dense one-tower checkpoint"):
        limoe_run = tmp_path / "not-dense"
        cfg = tiny_config(limoe_run, steps=1)
        cfg.eval.zero_shot = cfg.eval.retrieval = False
        upcycle(train(cfg, progress=False).checkpoint)
    with pytest.raises(UpcycleError, match="without MoE layers"):
        upcycle(checkpoint, "dense-tiny")
