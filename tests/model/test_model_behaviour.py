"""What the model must guarantee: every parameter learns, padding is inert, both modalities share the experts."""

import pytest
import torch

import limoe
from limoe.losses import compute_losses
from limoe.model.base import IMAGE, TEXT
from limoe.moe.layer import MoeMlp

from _model_synth import random_batch

TINY = [n for n in limoe.list_models() if n.endswith("-tiny")]


def _batch(config, batch=8, seed=0):
    return random_batch(config, batch, seed)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    # Generous capacity so no expert is starved by drops in a few steps (timm forces balance similarly).
    model = limoe.create_model(name, capacity_factor=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    touched = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for step in range(3):
        images, tokens = _batch(model.config, seed=step)
        tokens[:, -1] = 5  # use every text position so each position embedding gets a gradient
        opt.zero_grad()
        compute_losses(model(images, tokens))["total_loss"].backward()
        for n, p in model.named_parameters():
            assert p.grad is not None, f"{n} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
            touched[n] |= p.grad != 0
        opt.step()
    # Token-table rows of unseen ids legitimately get none; every other tensor must be touched everywhere,
    # and every expert's weights must have learned something.
    for n, hit in touched.items():
        if n.endswith("text_embed.tok.weight"):
            assert hit.any()
        elif ".experts." in n:
            assert hit.flatten(1).any(1).all(), f"an expert in {n} never received a gradient"
        else:
            assert hit.any(), f"{n} never received a non-zero gradient"


@pytest.mark.parametrize("name", TINY)
def test_padding_never_affects_text_embedding_or_routing(name):
    torch.manual_seed(0)
    model = limoe.create_model(name, eval_capacity_factor=8.0).eval()
    _, tokens = _batch(model.config, batch=6)
    valid = tokens != model.config.pad_id
    garbage = torch.where(valid, tokens, torch.randint(2, model.config.vocab_size, tokens.shape))
    with torch.no_grad():
        z_ref, aux_ref = model.encode_text(tokens, return_aux=True)
        z_garbage, aux_garbage = model.encode_text(garbage, valid_BT=valid, return_aux=True)
        shortest = int(valid.sum(1).max())  # cutting trailing padding changes S but must not change results
        z_cut, aux_cut = model.encode_text(tokens[:, :shortest], return_aux=True)
    torch.testing.assert_close(z_garbage, z_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(z_cut, z_ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(z_garbage, model.encode_text(garbage))  # without the mask the garbage is seen
    for ref, other in zip(aux_ref, aux_garbage):
        v = valid.reshape(-1)
        assert torch.equal(ref.routing.expert_SK[v], other.routing.expert_SK[v])
        assert torch.equal(ref.routing.kept_SK, other.routing.kept_SK)
        assert not ref.routing.kept_SK[~v].any()  # padding is never routed
        torch.testing.assert_close(ref.stats.processed_ME, other.stats.processed_ME)
        assert ref.stats.tokens_M[TEXT] == valid.sum()
    for ref, cut in zip(aux_ref, aux_cut):
        v = valid[:, :shortest].reshape(-1)
        assert torch.equal(ref.routing.expert_SK.view(6, -1, 1)[:, :shortest].reshape(-1, 1)[v],
                           cut.routing.expert_SK[v])


def test_empty_caption_gives_a_finite_embedding():
    model = limoe.create_model("limoe-tiny").eval()
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[1, :3] = torch.tensor([4, 5, 1])
    out = compute_losses(model(torch.randn(2, 3, 32, 32), tokens))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_image_and_text_passes_reach_the_same_experts():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", capacity_factor=4.0)
    images, tokens = _batch(model.config, batch=16)
    moe_layers = [m for m in model.modules() if isinstance(m, MoeMlp)]
    experts_by_modality = {}
    for modality, encode in ((IMAGE, lambda: model.encode_image(images)), (TEXT, lambda: model.encode_text(tokens))):
        model.zero_grad()
        encode().sum().backward()
        # Per layer, the experts whose weights this modality's pass reached.
        experts_by_modality[modality] = [
            set(torch.nonzero(layer.experts.w_in_Edh.grad.flatten(1).abs().sum(1)).flatten().tolist())
            for layer in moe_layers]
    for image_experts, text_experts in zip(experts_by_modality[IMAGE], experts_by_modality[TEXT]):
        assert image_experts & text_experts, "no expert is shared between image and text tokens"
    # Training's forward encodes pairs: one joint MoE call per layer, in which both modalities reach the experts.
    out = model(images, tokens)
    assert len(out.aux) == len(moe_layers)
    for aux in out.aux:
        assert aux.stats.processed_ME[IMAGE].sum() > 0 and aux.stats.processed_ME[TEXT].sum() > 0
    # Routed per modality, each layer reports an image call, then a text call.
    torch.manual_seed(0)
    apart = limoe.create_model("limoe-tiny", capacity_factor=4.0, routing_groups="per_modality")
    out = apart(images, tokens)
    assert len(out.aux) == 2 * len(moe_layers)
    for image_aux, text_aux in zip(out.aux[0::2], out.aux[1::2]):
        assert image_aux.stats.processed_ME[IMAGE].sum() > 0 and image_aux.stats.processed_ME[TEXT].sum() == 0
        assert text_aux.stats.processed_ME[TEXT].sum() > 0 and text_aux.stats.processed_ME[IMAGE].sum() == 0


def test_two_tower_keeps_modalities_apart():
    model = limoe.create_model("two-tower-tiny")
    images, tokens = _batch(model.config)
    model.encode_text(tokens).sum().backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.text_encoder.parameters())


def test_one_tower_shares_its_blocks():
    model = limoe.create_model("dense-tiny")
    images, tokens = _batch(model.config)
    model.encode_image(images).sum().backward()
    first = {n: p.grad.clone() for n, p in model.encoder.named_parameters()}
    model.zero_grad()
    model.encode_text(tokens).sum().backward()
    assert all(p.grad is not None and first[n].abs().sum() > 0 for n, p in model.encoder.named_parameters())


def test_pooling_options_and_sigmoid_bias():
    for pool in ("mean", "last"):
        model = limoe.create_model("limoe-tiny", text_pool=pool, image_pool=pool, logit_bias_init=-10.0)
        images, tokens = _batch(model.config)
        out = model(images, tokens)
        assert out.text_embeds.shape == (8, 64) and out.logit_bias.item() == -10.0
    with pytest.raises(ValueError):
        limoe.create_model("limoe-tiny", text_pool="cls")
