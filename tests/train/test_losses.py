"""Contrastive losses against direct formulas, the weighted total, and the cross-rank gather (2 gloo processes)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import limoe
from limoe.losses import LossConfig, clip_loss, compute_losses, siglip_loss, sum_aux_losses


def _embeds(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _clip_direct(x, y, s):
    """Literal per-element formula: -1/2n sum_i [log softmax_j(s x_i.y_j)_i + log softmax_j(s y_i.x_j)_i]."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        row = [s * float(x[i] @ y[j]) for j in range(n)]
        col = [s * float(y[i] @ x[j]) for j in range(n)]
        total -= row[i] - math.log(sum(math.exp(v) for v in row))
        total -= col[i] - math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def _siglip_direct(x, y, s, b):
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total -= math.log(1 / (1 + math.exp(-z * (s * float(x[i] @ y[j]) + b))))
    return total / n


def test_clip_loss_matches_direct_formula():
    x, y = _embeds()
    assert clip_loss(x, y, torch.tensor(7.0)).item() == pytest.approx(_clip_direct(x, y, 7.0), rel=1e-5)
    # Perfectly aligned, well-separated pairs give a loss near zero; swapping pairs makes it large.
    eye = torch.eye(4)
    assert clip_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6
    assert clip_loss(eye, eye.flip(0), torch.tensor(100.0)).item() > 50


def test_siglip_loss_matches_direct_formula():
    x, y = _embeds()
    got = siglip_loss(x, y, torch.tensor(10.0), torch.tensor(-3.0)).item()
    assert got == pytest.approx(_siglip_direct(x, y, 10.0, -3.0), rel=1e-5)
    assert siglip_loss(x, y, torch.tensor(10.0)).item() == pytest.approx(_siglip_direct(x, y, 10.0, 0.0), rel=1e-5)


def test_compute_losses_weights_and_sums_the_terms():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny")
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16)))
    config = LossConfig(importance=0.5, load=0.0, z=0.25, local_entropy={"text": 2.0},
                        global_entropy={"image": 1.0, "text": 0.0})
    terms = compute_losses(out, config)
    raw = sum_aux_losses(out.aux)
    assert set(raw) == {"importance", "load", "z", "local_entropy/image", "local_entropy/text",
                        "global_entropy/image", "global_entropy/text"}
    # Summed over the MoE calls: 2 layers, each routing images and texts in joint groups.
    assert len(out.aux) == 2
    torch.testing.assert_close(raw["z"], sum(a.losses["z"] for a in out.aux))
    # A modality an entropy weight leaves out keeps the top_k router's default (local_entropy/image: 0.01).
    assert set(k for k in terms if k.endswith("_loss")) == {
        "contrastive_loss", "importance_loss", "z_loss", "local_entropy_image_loss", "local_entropy_text_loss",
        "global_entropy_image_loss", "total_loss"}
    torch.testing.assert_close(terms["importance_loss"], 0.5 * raw["importance"])
    torch.testing.assert_close(terms["local_entropy_text_loss"], 2.0 * raw["local_entropy/text"])
    torch.testing.assert_close(terms["local_entropy_image_loss"], 0.01 * raw["local_entropy/image"])
    torch.testing.assert_close(terms["contrastive_loss"], clip_loss(out.image_embeds, out.text_embeds,
                                                                     out.logit_scale))
    expected = sum(v for k, v in terms.items() if k.endswith("_loss") and k != "total_loss")
    torch.testing.assert_close(terms["total_loss"], expected)
    terms["total_loss"].backward()
    assert model.logit_scale.grad is not None


def test_per_modality_aux_terms_come_only_from_their_own_pass():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", routing_groups="per_modality")
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16)))
    image_aux, text_aux = out.aux[0::2], out.aux[1::2]  # 2 MoE layers, each routing images, then texts
    # A pass contributes exactly 0 to the other modality's terms, so the sum over all passes is the own-pass sum.
    for a in text_aux:
        assert a.losses["global_entropy/image"].item() == 0.0 and a.losses["local_entropy/image"].item() == 0.0
    for a in image_aux:
        assert a.losses["global_entropy/text"].item() == 0.0 and a.losses["local_entropy/text"].item() == 0.0
    raw = sum_aux_losses(out.aux)
    torch.testing.assert_close(raw["local_entropy/text"], sum(a.losses["local_entropy/text"] for a in text_aux))
    assert raw["local_entropy/text"].item() > 0
    torch.testing.assert_close(raw["importance"], sum(a.losses["importance"] for a in out.aux))
    # Every aux term's gradient is finite, including the global entropy of each modality.
    compute_losses(out, LossConfig(global_entropy={"image": 1.0, "text": 1.0}))["total_loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sigmoid_option_uses_the_model_bias():
    model = limoe.create_model("dense-tiny", logit_bias_init=-10.0)
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16)))
    terms = compute_losses(out, LossConfig(contrastive="sigmoid"))
    torch.testing.assert_close(terms["contrastive_loss"],
                               siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias))
    assert terms["total_loss"] == terms["contrastive_loss"]
    with pytest.raises(ValueError):
        LossConfig(contrastive="hinge")


# -- two processes --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x_all, y_all = _embeds(n=4 * world, d=8, seed=1)
        shard = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for name, fn in (("clip_local", lambda x, y: clip_loss(x, y, torch.tensor(5.0), local_loss=True)),
                         ("clip_full", lambda x, y: clip_loss(x, y, torch.tensor(5.0), local_loss=False)),
                         ("siglip_local", lambda x, y: siglip_loss(x, y, torch.tensor(5.0), -1.0, local_loss=True)),
                         ("siglip_full", lambda x, y: siglip_loss(x, y, torch.tensor(5.0), -1.0,
                                                                  local_loss=False))):
            x = x_all[shard].clone().requires_grad_()
            y = y_all[shard].clone().requires_grad_()
            loss = fn(x, y)
            loss.backward()
            results[name] = (loss.detach(), x.grad, y.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing gloo down under a busy peer can abort it
    finally:
        dist.destroy_process_group()


def test_gathered_loss_equals_single_process_loss(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x_all, y_all = _embeds(n=4 * world, d=8, seed=1)
    for name, fn in (("clip", lambda x, y: clip_loss(x, y, torch.tensor(5.0))),
                     ("siglip", lambda x, y: siglip_loss(x, y, torch.tensor(5.0), -1.0))):
        x = x_all.clone().requires_grad_()
        y = y_all.clone().requires_grad_()
        single = fn(x, y)
        single.backward()
        for variant in ("local", "full"):
            losses = torch.stack([r[f"{name}_{variant}"][0] for r in ranks])
            if variant == "full":  # every rank computes the whole global loss
                torch.testing.assert_close(losses, single.detach().expand(world))
            else:  # each rank scores its own rows; their mean is the global loss
                assert not torch.allclose(losses[0], losses[1])
                torch.testing.assert_close(losses.mean(), single.detach())
            # The gather's backward sums every rank's terms into the local shard: world x the global gradient,
            # which DDP's averaging over ranks turns back into exactly the global gradient.
            grad_x = torch.cat([r[f"{name}_{variant}"][1] for r in ranks])
            grad_y = torch.cat([r[f"{name}_{variant}"][2] for r in ranks])
            torch.testing.assert_close(grad_x / world, x.grad)
            torch.testing.assert_close(grad_y / world, y.grad)


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16)))
        terms = compute_losses(out)
    assert out.image_embeds.dtype == torch.bfloat16
    assert terms["contrastive_loss"].dtype == torch.float32
    expected = clip_loss(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale.float())
    torch.testing.assert_close(terms["contrastive_loss"], expected)
    terms["total_loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
