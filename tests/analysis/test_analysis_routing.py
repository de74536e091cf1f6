"""Routing statistics under forced routing: every number is counted by hand.

limoe-tiny: 32 px images in 8 px patches (16 tokens per image), 16 text positions, MoE in blocks 1 and 3,
4 experts, k = 1, routing groups of 4 pairs here. Forced routing sends all image tokens to one expert and all
text tokens to one expert with one gate per modality, so slots go in token order within a modality (BPR keeps
token order on ties) and which tokens fit into capacity can be counted. By default the analysis encodes pairs as
training does: a pair is 16 patches then 16 text positions of one joint routing group.
"""

import json
import math

import pytest
import torch

import limoe
from limoe.analysis import AnalysisConfig, analyze_routing
from _analysis_forced import WordTokenizer, force_routing, images

WORDS = ["red", "blue", "circle", "square", "big", "small", "a", "photo", "of"]


def tiny(monkeypatch, routing=None, **moe):
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", num_experts=4, **{"group_size": 4, **moe})
    force_routing(model, monkeypatch, **(routing or {}))
    return model


def test_ample_capacity_shares_and_success(monkeypatch):
    # eval capacity factor 4: C = ceil(128 * 4 / 4) = 128 slots >= every token of a group of 4 pairs: no drops.
    model = tiny(monkeypatch, eval_capacity_factor=4.0)
    captions = ["red circle", "blue square", "a big red circle", "small blue square",
                "red", "blue", "a photo of red", "circle"]
    tok = WordTokenizer(WORDS)
    result = analyze_routing(model, tok, zip(images(8), captions), AnalysisConfig(batch_size=4))
    assert [lr.ref.block for lr in result.layers] == [1, 3]
    text_tokens = sum(len(c.split()) + 1 for c in captions)  # words + <eos> = 3+3+5+4+2+2+5+2 = 26
    assert text_tokens == 26
    for lr in result.layers:
        s = lr.stats
        assert s.tokens_M.tolist() == [8 * 16, 26]
        assert s.routing_success_M.tolist() == [1.0, 1.0]
        assert s.dropped_fraction_M.tolist() == [0.0, 0.0]
        assert s.processed_ME.tolist() == [[128, 0, 0, 0], [0, 26, 0, 0]]
        assert s.share_of("image")[:2].tolist() == [1.0, 0.0]
        assert torch.isnan(s.share_of("image")[2:]).all()  # experts 2 and 3 processed nothing
        assert s.expert_load_E.tolist() == pytest.approx([128 / 154, 26 / 154, 0, 0])
        # Every patch of every mapped image went to expert 0 and was kept.
        assert lr.map_expert_IP.shape == (8, 16) and (lr.map_expert_IP == 0).all() and lr.map_kept_IP.all()
    # Typical tokens: expert 1 took every text token; "red" 4x, <eos> 8x; expert 0 took none.
    top = dict((t, c) for t, c, _ in result.top_tokens_of(0, 1))
    assert top["<eos>"] == 8 and top["red"] == 4 and top["blue"] == 3 and top["circle"] == 3
    assert result.top_tokens_of(0, 0) == []
    data = json.loads(json.dumps(result.to_json()))  # plain JSON: no NaN, no tensors
    layer = data["layers"][0]
    assert layer["modality"]["text"]["routing_success"] == 1.0
    assert [e["share"]["image"] for e in layer["experts"]] == [1.0, 0.0, None, None]
    assert layer["experts"][1]["processed"] == {"image": 0.0, "text": 26.0}
    assert len(data["maps"]["expert"][0]) == 8


def test_capacity_drops_counted_by_hand_in_separate_passes(monkeypatch):
    # Each modality in its own pass (as inference routes), eval capacity factor 1: C = ceil(64 / 4) = 16 slots per
    # expert and group of 4 images (64 patches) or 4 texts (64 positions, padding included).
    model = tiny(monkeypatch, eval_capacity_factor=1.0)
    long_caption = "a photo of a big red"  # 6 words + <eos> = 7 tokens
    captions = [long_caption] * 4 + ["red circle"] * 4  # batch 1: 28 text tokens; batch 2: 12
    tok = WordTokenizer(WORDS)
    result = analyze_routing(model, tok, zip(images(8), captions),
                             AnalysisConfig(batch_size=4, num_maps=8, pairs=False))
    assert result.to_json()["passes"] == "separate"
    for lr in result.layers:
        s = lr.stats
        # Images: 2 batches x 64 patches, 16 kept per batch -> success 32 / 128.
        assert s.tokens_M.tolist() == [128, 40]
        assert s.top1_kept_M.tolist() == [32, 16 + 12]
        assert s.routing_success_M.tolist() == [0.25, pytest.approx(28 / 40)]
        assert s.dropped_fraction_M.tolist() == [0.75, pytest.approx(12 / 40)]
        assert s.routed_ME[0, 0] == 128 and s.processed_ME[0, 0] == 32
        # Slots go in token order: only the first image of each batch (its 16 patches) fits.
        kept_rows = lr.map_kept_IP.all(1).tolist()
        assert kept_rows == [True, False, False, False, True, False, False, False]
        assert not lr.map_kept_IP[[1, 2, 3, 5, 6, 7]].any()
        # The highest-gate patches of expert 0 can only come from those kept images.
        assert {p["image"] for p in result.top_patches_of(0, 0)} <= {0, 4}
    # Batch 1 keeps the first 16 of its 28 text tokens: captions 1-2 whole (2 x 7) and "a photo" of caption 3;
    # batch 2 keeps all 12. So expert 1 saw "a": 2 per caption x 2 + 1 = 5, "photo": 3, "big": 2, "red": 2 + 4.
    top = dict((t, c) for t, c, _ in result.top_tokens_of(1, 1))
    assert top == {"a": 5, "photo": 3, "of": 2, "big": 2, "red": 6, "<eos>": 6, "circle": 4}
    assert [lr.ref.passes for lr in result.layers] == [("image", "text")] * 2


@pytest.mark.parametrize("bpr", [False, True])
def test_joint_groups_make_text_compete_with_images_counted_by_hand(monkeypatch, bpr):
    # Pairs as in training, every token of both modalities sent to expert 0; groups of 2 pairs hold
    # 2 x (16 + 16) = 64 tokens, so C = 16 at eval capacity factor 1. Token order is pair 0's 16 patches, its
    # text, pair 1's patches, its text. Text gates (logit 10) beat image gates (logit 5).
    model = tiny(monkeypatch, dict(image_expert=0, text_expert=0, image_logit=5.0, text_logit=10.0), group_size=2,
                 eval_capacity_factor=1.0, batch_priority=bpr)
    captions = ["red circle", "blue square", "a big red circle", "small"]  # 3 + 3 | 5 + 2 text tokens
    result = analyze_routing(model, WordTokenizer(WORDS), zip(images(4), captions), AnalysisConfig(batch_size=4))
    assert result.to_json()["passes"] == "pairs"
    for lr in result.layers:
        s = lr.stats
        assert lr.ref.passes == ("pairs",)
        assert s.tokens_M.tolist() == [64, 13]
        if bpr:
            # Text claims its slots first (6 and 7 tokens), images fill the rest in order: 10 and 9 patches.
            assert s.top1_kept_M.tolist() == [10 + 9, 13]
            assert lr.map_kept_IP.sum(1).tolist() == [10, 0, 9, 0]
        else:
            # Token order: pair 0's patches take all 16 slots; its text and everything after drops.
            assert s.top1_kept_M.tolist() == [16 + 16, 0]
            assert lr.map_kept_IP.sum(1).tolist() == [16, 0, 16, 0]
        assert s.processed_ME[:, 1:].sum() == 0


def test_train_routing_uses_train_capacity_and_restores_mode(monkeypatch):
    model = tiny(monkeypatch, capacity_factor=1.0, eval_capacity_factor=4.0)
    tok = WordTokenizer(WORDS)
    pairs = list(zip(images(4), ["red"] * 4))
    model.eval()
    evaluated = analyze_routing(model, tok, pairs, AnalysisConfig(batch_size=4))
    trained = analyze_routing(model, tok, pairs, AnalysisConfig(batch_size=4, train_routing=True))
    assert evaluated.layers[0].stats.routing_success_M[0] == 1.0
    # One group of 4 pairs, 128 tokens: C = 32 at the train factor 1, so 32 of the 64 patches fit.
    assert trained.layers[0].stats.routing_success_M[0] == 0.5
    assert not model.training
    assert trained.to_json()["routing"] == "train"


def test_num_pairs_limits_the_sample(monkeypatch):
    model = tiny(monkeypatch)
    result = analyze_routing(model, WordTokenizer(WORDS), zip(images(10), ["red"] * 10),
                             AnalysisConfig(num_pairs=6, batch_size=4, num_maps=3))
    assert result.num_pairs == 6
    assert result.layers[0].stats.tokens_M.tolist() == [6 * 16, 6 * 2]
    assert len(result.map_captions) == 3 and result.layers[0].map_expert_IP.shape == (3, 16)
    with pytest.raises(ValueError, match="no pairs"):
        analyze_routing(model, WordTokenizer(WORDS), [], AnalysisConfig())


@pytest.mark.parametrize("name", ["dense-tiny", "two-tower-tiny"])
def test_models_without_moe_have_nothing_to_route(name):
    model = limoe.create_model(name)
    result = analyze_routing(model, WordTokenizer(WORDS), zip(images(3), ["red"] * 3))
    assert not result.has_moe
    data = result.to_json()
    assert data["has_moe"] is False and data["layers"] == [] and data["num_pairs"] == 3


def test_two_tower_moe_layers_are_per_tower(monkeypatch):
    # Each tower has its own MoE layers: image-tower layers see only images, text-tower layers only text.
    torch.manual_seed(0)
    model = limoe.create_model("two-tower-tiny", moe_layers="every:2", num_experts=4, eval_capacity_factor=4.0)
    force_routing(model, monkeypatch)
    result = analyze_routing(model, WordTokenizer(WORDS), zip(images(4), ["red circle"] * 4))
    assert [lr.ref.name for lr in result.layers] == ["image block 1", "image block 3", "text block 1", "text block 3"]
    image_layer, text_layer = result.layers[0], result.layers[2]
    assert image_layer.stats.tokens_M.tolist() == [64, 0] and text_layer.stats.tokens_M.tolist() == [0, 12]
    assert math.isnan(image_layer.stats.routing_success_M[1])
    assert len(text_layer.map_expert_IP) == 0
    assert result.to_json()["layers"][0]["modality"]["text"]["routing_success"] is None
