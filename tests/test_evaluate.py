"""Evaluation metrics on hand-made embeddings with known answers, and the streaming glue on real models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import limoe
from limoe import evaluate as ev

from _model_synth import COLOURS, SHAPES, pairs, tokenize


def test_zero_shot_top1_top5_known_answer():
    class_YD = torch.eye(6)
    # Images 0-3 point at their class; image 4 (label 2) is nearest class 5, second nearest class 2.
    images = F.normalize(torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                       [0, 0, 0, 1, 0, 0], [0, 0, 0.6, 0, 0, 0.8]], dtype=torch.float), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 2])
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]  # streaming over two batches
    got = ev.zero_shot_from_embeddings(batches, class_YD, topk=(1, 2, 5))
    assert got == {"top1": 4 / 5, "top2": 1.0, "top5": 1.0}


def test_class_embeddings_average_prompt_templates():
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def encode_text(self, tokens):  # embedding = normalised one-hot of the first word id
            return F.one_hot(tokens[:, 0], 16).float()

    templates = ("{} photo", "a {}")  # "a" is word id 2: both prompts of a class share that second embedding
    class_YD = ev.class_embeddings(Stub(), ["red", "blue"], tokenize, templates)
    red, blue, a = (tokenize([w])[0, 0].item() for w in ("red", "blue", "a"))
    expected = torch.zeros(2, 16)
    expected[0, [red, a]] = 2 ** -0.5
    expected[1, [blue, a]] = 2 ** -0.5
    torch.testing.assert_close(class_YD, expected)


def test_retrieval_known_answer_with_several_captions_per_image():
    image_ID = torch.eye(3)
    # Texts 0, 1 describe image 0; text 2 image 1; texts 3, 4 image 2.
    text_JD = F.normalize(torch.tensor([[0.2, 1.0, 0.0],   # closest to image 1: wrong
                                        [1.0, 0.1, 0.0],   # closest to image 0: right
                                        [1.0, 0.3, 0.0],   # closest to image 0: wrong (image 1 second)
                                        [0.0, 0.0, 1.0],
                                        [0.0, 0.5, 1.0]]), dim=-1)
    owner_J = torch.tensor([0, 0, 1, 2, 2])
    got = ev.retrieval_from_embeddings(image_ID, text_JD, owner_J, ks=(1, 2, 5), chunk=2)
    # image 0: best texts are 2 (0.96), 1 (0.995)... rank own text 1 first -> hit@1.
    # image 1: sims 0.98 (t0), 0.29 (t2)... own text 2 is 3rd (t0, t4 0.45 above) -> miss@2, hit@5.
    # image 2: own text 3 first -> hit@1.
    assert got["image_to_text/R@1"] == pytest.approx(2 / 3)
    assert got["image_to_text/R@2"] == pytest.approx(2 / 3)
    assert got["image_to_text/R@5"] == 1.0
    # texts: t0 -> image 1 first (miss@1, hit@2), t1 hit@1, t2 -> image 0 first (miss@1, hit@2), t3, t4 hit@1.
    assert got["text_to_image/R@1"] == pytest.approx(3 / 5)
    assert got["text_to_image/R@2"] == 1.0


def test_ridge_probe_separates_clusters_and_select_shots_takes_first_k():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3
    labels = torch.arange(4).repeat(30)
    x = centres[labels] + 0.3 * torch.randn(120, 8, generator=g)
    batches = [(x[i:i + 16], labels[i:i + 16]) for i in range(0, 120, 16)]
    train_x, train_y = ev.select_shots(iter(batches), shots=3, num_classes=4)
    assert train_y.tolist() == [0, 1, 2, 3] * 3 and torch.equal(train_x, x[:12])
    assert ev.linear_probe_from_embeddings(train_x, train_y, batches, 4)["accuracy"] == 1.0
    # Labels that are noise cannot be learnt from 1 shot: the probe must not score perfectly on held-out data.
    shuffled = labels[torch.randperm(120, generator=g)]
    noisy = [(x[i:i + 16], shuffled[i:i + 16]) for i in range(0, 120, 16)]
    assert ev.linear_probe_from_embeddings(x[:4], shuffled[:4], noisy, 4)["accuracy"] < 0.6


def test_probe_balanced_accuracy_weighs_every_class_equally():
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    # Three class-0 points are classified right; the one class-1 point sits among class 0 and is missed.
    test = [(torch.tensor([[1.0, 0.0], [0.9, 0.0], [1.0, 0.05], [1.0, 0.0]]), torch.tensor([0, 0, 0, 1]))]
    got = ev.linear_probe_from_embeddings(train_x, train_y, test, 3)  # class 2 is absent from the test set
    assert got["accuracy"] == 0.75
    assert got["balanced_accuracy"] == 0.5


class ColourModel(nn.Module):
    """A stand-in with a known answer: image embedding = its colour, text embedding = the colour word."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def encode_image(self, images):
        return F.normalize(images.mean((2, 3)), dim=-1)

    def encode_text(self, tokens):
        colour_ids = [tokenize([c])[0, 0].item() for c in COLOURS]
        rgb = torch.tensor(list(COLOURS.values()))
        pick = torch.stack([(tokens == i).any(1) for i in colour_ids], 1).float()
        return F.normalize(pick @ ((rgb - 0.5) / 0.25), dim=-1)


def _image_batches(images, labels, size=5):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def test_model_level_functions_stream_and_find_known_answers():
    images, captions, labels = pairs(32)
    colour_labels = labels // len(SHAPES)
    model = ColourModel().train()
    acc = ev.zero_shot_classification(model, _image_batches(images, colour_labels), list(COLOURS), tokenize,
                                      templates=("a photo of a {}", "{}"), topk=(1,))
    assert acc == {"top1": 1.0} and model.training  # mode restored
    # Two captions per image. Captions of one colour embed identically, so an image ties with its own captions
    # (ties rank in the query's favour: found at 1); a caption can only tell its image from the 7 other images
    # of that colour (found within 8).
    batches = [(images[i:i + 8], [[c, c.split()[0]] for c in captions[i:i + 8]]) for i in range(0, 32, 8)]
    got = ev.retrieval(model, batches, tokenize, ks=(1, 8))
    assert got["image_to_text/R@1"] == 1.0 and got["text_to_image/R@8"] == 1.0
    probe = ev.few_shot_linear_probe(model, _image_batches(images, colour_labels),
                                     _image_batches(images, colour_labels), num_classes=4, shots=2)
    assert probe["accuracy"] == 1.0 and model.training


@pytest.mark.parametrize("name", [n for n in limoe.list_models() if n.endswith("-tiny")])
def test_every_metric_runs_on_registry_models(name):
    torch.manual_seed(0)
    model = limoe.create_model(name)
    images, captions, labels = pairs(16)
    zs = ev.zero_shot_classification(model, _image_batches(images, labels, 6),
                                     captions, tokenize, templates=("{}",))
    assert set(zs) == {"top1", "top5"} and 0 <= zs["top1"] <= zs["top5"] <= 1
    ret = ev.retrieval(model, [(images[:8], captions[:8]), (images[8:], tokenize(captions[8:]))], tokenize)
    assert len(ret) == 6 and all(0 <= v <= 1 for v in ret.values())
    assert ret["image_to_text/R@10"] >= ret["image_to_text/R@5"] >= ret["image_to_text/R@1"]
    probe = ev.few_shot_linear_probe(model, _image_batches(images, labels % 4), _image_batches(images, labels % 4),
                                     num_classes=4, shots=2)
    assert 0 <= probe["accuracy"] <= 1 and model.training


def test_non_finite_embeddings_are_refused_not_scored():
    from limoe.evaluate import NonFiniteEmbeddings, retrieval_from_embeddings, zero_shot_from_embeddings

    z_BD = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    broken = z_BD.clone()
    broken[1, 3] = float("nan")
    with pytest.raises(NonFiniteEmbeddings):
        retrieval_from_embeddings(broken, z_BD, torch.arange(4))  # NaN ties would count as hits: R@1 100%
    with pytest.raises(NonFiniteEmbeddings):
        zero_shot_from_embeddings([(broken, torch.arange(4))], z_BD)


def test_contrastive_loss_on_fixed_batches_golden_case():
    # Five pairs of orthogonal unit embeddings, batches of two: every batch's logits are [[s, 0], [0, s]], so each
    # cross-entropy (over rows and over columns) is log(1 + e^-s); the fifth pair is the remainder, left out.
    s = 3.0
    z_BD = torch.eye(5)
    loss = ev.contrastive_loss_from_embeddings(z_BD, z_BD.clone(), s, batch_size=2, seed=0)
    assert loss == pytest.approx(math.log1p(math.exp(-s)), abs=1e-6)
    # Fewer pairs than a batch: one batch of all of them (logits 3x3: log(1 + 2 e^-s)).
    assert ev.contrastive_loss_from_embeddings(z_BD[:3], z_BD[:3], s, batch_size=8) == pytest.approx(
        math.log1p(2 * math.exp(-s)), abs=1e-6)
    # The batches are a fixed shuffle, not the global generator's: another global seed gives the same number.
    g = torch.Generator().manual_seed(1)
    image_BD = F.normalize(torch.randn(9, 4, generator=g), dim=-1)
    text_BD = F.normalize(torch.randn(9, 4, generator=g), dim=-1)
    torch.manual_seed(0)
    first = ev.contrastive_loss_from_embeddings(image_BD, text_BD, s, batch_size=4)
    torch.manual_seed(123)
    assert ev.contrastive_loss_from_embeddings(image_BD, text_BD, s, batch_size=4) == first


def test_contrastive_loss_matches_the_training_loss_on_one_batch():
    from limoe.losses import clip_loss

    g = torch.Generator().manual_seed(0)
    image_BD = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text_BD = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7))
    want = clip_loss(image_BD[order], text_BD[order], torch.tensor(4.0))
    assert ev.contrastive_loss_from_embeddings(image_BD, text_BD, 4.0, batch_size=6, seed=7) == pytest.approx(
        float(want), rel=1e-6)
    with pytest.raises(ValueError, match="one text per image"):
        ev.contrastive_loss_from_embeddings(image_BD, text_BD[:5], 4.0)
