"""Training's forward encodes image-text pairs in lockstep; a joint MoE routes each pair's tokens in shared groups."""

import pytest
import torch

import limoe
from limoe.moe import MoeMlp

from _model_synth import random_batch


def _pairs(config, batch, seed=0):
    return random_batch(config, batch, seed, min_length=2)


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = limoe.create_model(name, **overrides)
    for layer in model.modules():  # sharper routers than the init: capacity binds and groups matter
        if isinstance(layer, MoeMlp):
            torch.nn.init.normal_(layer.router.router_dE, std=1.0)
    return model


def _separate_passes(model, images, tokens):
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("train", [False, True])
def test_dense_lockstep_equals_separate_passes(train):
    model = _model("dense-tiny").train(train)
    images, tokens = _pairs(model.config, 6)
    out = model(images, tokens)
    image_BD, text_BD = _separate_passes(model, images, tokens)
    torch.testing.assert_close(out.image_embeds, image_BD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, text_BD, rtol=1e-5, atol=1e-6)
    assert out.aux == []


def test_per_modality_routing_equals_separate_passes_even_when_tokens_drop():
    model = _model("limoe-tiny", routing_groups="per_modality", eval_capacity_factor=0.5).eval()
    images, tokens = _pairs(model.config, 6)
    out = model(images, tokens)
    _, image_aux = model.encode_image(images, return_aux=True)
    assert any(not bool(a.routing.kept_SK.all()) for a in image_aux)  # capacity binds
    image_BD, text_BD = _separate_passes(model, images, tokens)
    torch.testing.assert_close(out.image_embeds, image_BD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, text_BD, rtol=1e-5, atol=1e-6)


def test_joint_routing_without_drops_equals_separate_passes():
    # With room for every token the MoE is a per-token function, so how tokens are grouped cannot matter: this
    # checks the lockstep plumbing (concatenation, modality ids, padding, the split back) on its own.
    model = _model("limoe-tiny", eval_capacity_factor=16.0).eval()
    images, tokens = _pairs(model.config, 6)
    out = model(images, tokens)
    assert all(bool(a.routing.kept_SK[a.routing.slot_SK >= 0].all()) for a in out.aux)
    image_BD, text_BD = _separate_passes(model, images, tokens)
    torch.testing.assert_close(out.image_embeds, image_BD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, text_BD, rtol=1e-5, atol=1e-6)


def test_joint_groups_hold_each_pairs_patches_and_text_tokens():
    # group_size=1: every pair is a group of its own, so the batch's output is each pair's output alone; and
    # each joint call counts every patch and every real text token under its modality.
    model = _model("limoe-tiny", group_size=1, eval_capacity_factor=0.5).eval()
    images, tokens = _pairs(model.config, 5)
    out = model(images, tokens)
    num_patches, valid = model.config.num_patches, tokens != model.config.pad_id
    for aux in out.aux:
        assert aux.routing.num_groups == 5
        assert aux.stats.tokens_M.tolist() == [5 * num_patches, valid.sum().item()]
        assert not bool(aux.routing.kept_SK[aux.routing.slot_SK >= 0].all())  # capacity binds
    for b in range(5):
        alone = model(images[b:b + 1], tokens[b:b + 1])
        torch.testing.assert_close(out.image_embeds[b:b + 1], alone.image_embeds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.text_embeds[b:b + 1], alone.text_embeds, rtol=1e-5, atol=1e-6)
    # A pair's text competes with its own patches: routed together, not as in separate passes.
    image_BD, text_BD = _separate_passes(model, images, tokens)
    assert not torch.allclose(out.image_embeds, image_BD, atol=1e-4)


def test_forward_of_2g_pairs_equals_its_two_halves():
    # Training mode without router noise: groups of G pairs make routing independent of what else the batch
    # holds, which is what makes DDP, expert parallelism and gradient accumulation route as one process does.
    model = _model("limoe-tiny", group_size=4, noise_std=0.0, capacity_factor=0.5).train()
    images, tokens = _pairs(model.config, 8)
    out = model(images, tokens)
    halves = [model(images[i:i + 4], tokens[i:i + 4]) for i in (0, 4)]
    torch.testing.assert_close(out.image_embeds, torch.cat([h.image_embeds for h in halves]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_embeds, torch.cat([h.text_embeds for h in halves]), rtol=1e-5, atol=1e-6)
    for layer, aux in enumerate(out.aux):
        assert aux.routing.num_groups == 2
        for name, value in aux.losses.items():
            want = (halves[0].aux[layer].losses[name] + halves[1].aux[layer].losses[name]) / 2
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7, msg=name)
    whole = _model("limoe-tiny", group_size=8, noise_std=0.0, capacity_factor=0.5).train()(images, tokens)
    assert not torch.allclose(whole.text_embeds, out.text_embeds, atol=1e-4)  # one group of 8 routes otherwise


def test_forward_needs_as_many_texts_as_images():
    model = limoe.create_model("limoe-tiny")
    images, tokens = _pairs(model.config, 4)
    with pytest.raises(ValueError, match="as many texts as images"):
        model(images, tokens[:3])



@pytest.mark.slow
def test_joint_forward_and_losses_compile_as_one_graph():
    from limoe.losses import compute_losses

    model = _model("limoe-tiny", eval_capacity_factor=0.75).eval()  # eval: compiled code draws noise otherwise
    images, tokens = _pairs(model.config, 12)  # 12 pairs in groups of 8: the last group is filled with padding

    def step(images, tokens):
        terms = compute_losses(model(images, tokens))
        return terms["total_loss"], terms["aux/importance"]

    compiled = torch.compile(step, fullgraph=True)(images, tokens)
    for got, want in zip(compiled, step(images, tokens)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
