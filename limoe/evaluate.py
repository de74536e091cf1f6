"""Zero-shot classification, image-text retrieval and k-shot linear probes for any registry model.

Every `model`-level function streams batches from an iterable (a DataLoader or any generator) and keeps only
embeddings, never a whole dataset of images. Batches are `(images, targets)` pairs (tuples, lists or dicts with
keys "image" and "label"/"text"). Text is tokenized by the caller's `tokenize(list[str]) -> LongTensor[B, T]`,
so evaluation does not depend on a particular tokenizer. The `*_from_embeddings` functions hold the metrics
themselves and work on hand-made embeddings.
"""

from __future__ import annotations

import contextlib
import string
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from limoe.deprecation import renamed_arguments

Tokenize = Callable[[list[str]], torch.Tensor]
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


class NonFiniteEmbeddings(ValueError):
    """NaN/inf embeddings: every similarity would tie, and ties would score as hits (R@1 100%)."""


def check_finite(z: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(z).all()):
        raise NonFiniteEmbeddings(f"non-finite {what}: the model's weights or inputs are broken")
    return z


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no gradients inside; the model's previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _pair(batch: Any, second: str) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        return batch["image"], batch[second]
    images, targets = batch[0], batch[1]
    return images, targets


def is_template(text: str) -> bool:
    """A prompt template: exactly one '{}' where the class name goes (literal braces doubled: '{{', '}}')."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError:  # a lone '{' or '}'
        return False
    return fields == [""]


def _topk_hits(scores_BY: torch.Tensor, labels_B: torch.Tensor, topk: Sequence[int]) -> dict[int, int]:
    k_max = min(max(topk), scores_BY.shape[1])
    hit_BK = scores_BY.topk(k_max, dim=1).indices == labels_B[:, None]
    return {k: int(hit_BK[:, :k].any(1).sum()) for k in topk}


# -- zero-shot classification ---------------------------------------------------------------------------------
def class_embeddings(model: nn.Module, classnames: Sequence[str], tokenize: Tokenize,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> torch.Tensor:
    """[Y, D]: per class, the normalised mean of the normalised text embeddings of its prompts."""
    bad = [t for t in templates if not is_template(t)]
    if bad or not templates:
        raise ValueError(f"every prompt template needs exactly one '{{}}' for the class name (other braces "
                         f"doubled); bad: {list(bad[:3])}")
    per_chunk = max(1, batch_size // len(templates))
    out = []
    with _eval_mode(model) as device:
        for start in range(0, len(classnames), per_chunk):
            names = classnames[start:start + per_chunk]
            prompts = [t.format(name) for name in names for t in templates]
            z_BD = F.normalize(model.encode_text(tokenize(prompts).to(device)), dim=-1)
            out.append(F.normalize(z_BD.view(len(names), len(templates), -1).mean(1), dim=-1))
    return torch.cat(out)


@renamed_arguments(class_embeds_CD="class_embeds_YD")
def zero_shot_hits(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], class_embeds_YD: torch.Tensor,
                   topk: Sequence[int] = (1, 5)) -> tuple[dict[int, int], int]:
    """({k: images whose class is among their k nearest class embeddings}, images) over (image_embeds [B, D],
    labels [B]) batches: counts, so that the accuracies of several subsets pool exactly."""
    hits = dict.fromkeys(topk, 0)
    count = 0
    check_finite(class_embeds_YD, "class embeddings")
    for image_BD, labels_B in batches:
        check_finite(image_BD, "image embeddings")
        for k, h in _topk_hits(image_BD @ class_embeds_YD.T.to(image_BD), labels_B.to(image_BD.device),
                               topk).items():
            hits[k] += h
        count += labels_B.shape[0]
    return hits, count


@renamed_arguments(class_embeds_CD="class_embeds_YD")
def zero_shot_from_embeddings(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], class_embeds_YD: torch.Tensor,
                              topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of nearest-class-embedding prediction over (image_embeds [B, D], labels [B]) batches."""
    hits, count = zero_shot_hits(batches, class_embeds_YD, topk)
    return {f"top{k}": hits[k] / max(count, 1) for k in topk}


def image_embeddings(model: nn.Module, loader: Iterable, second: str = "label"
                     ) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield (normalised image embeddings [B, D], the batch's targets) for every batch of `loader`."""
    with _eval_mode(model) as device:
        for batch in loader:
            images, targets = _pair(batch, second)
            yield F.normalize(model.encode_image(images.to(device)), dim=-1), targets


def zero_shot_classification(model: nn.Module, loader: Iterable, classnames: Sequence[str], tokenize: Tokenize,
                             templates: Sequence[str] = DEFAULT_TEMPLATES, topk: Sequence[int] = (1, 5)
                             ) -> dict[str, float]:
    """Classify (images, labels) batches by the most similar class prompt ensemble; returns {"top1", "top5"}."""
    class_YD = class_embeddings(model, classnames, tokenize, templates)
    return zero_shot_from_embeddings(((z, torch.as_tensor(y)) for z, y in image_embeddings(model, loader)),
                                     class_YD, topk)


# -- retrieval ------------------------------------------------------------------------------------------------
@renamed_arguments(image_ND="image_ID", text_MD="text_JD", text_image_M="text_image_J")
def retrieval_from_embeddings(image_ID: torch.Tensor, text_JD: torch.Tensor, text_image_J: torch.Tensor,
                              ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways; text j describes image text_image_J[j], an image may have several texts.

    image->text: an image counts as found at k if any of its texts is among its k most similar texts;
    text->image: a text counts if its image is among its k most similar images. Ties rank in the query's favour.
    """
    check_finite(image_ID, "image embeddings"), check_finite(text_JD, "text embeddings")
    text_image_J = text_image_J.to(image_ID.device).long()
    num_images, num_texts = image_ID.shape[0], text_JD.shape[0]
    i2t = dict.fromkeys(ks, 0)
    t2i = dict.fromkeys(ks, 0)
    for start in range(0, num_images, chunk):  # a chunk of the images, and all texts
        sim_IJ = image_ID[start:start + chunk] @ text_JD.T
        own_IJ = text_image_J[None, :] == torch.arange(start, start + sim_IJ.shape[0], device=image_ID.device)[:, None]
        best_I = sim_IJ.masked_fill(~own_IJ, float("-inf")).amax(1)
        rank_I = (sim_IJ > best_I[:, None]).sum(1)  # texts strictly better than the best own text
        for k in ks:
            i2t[k] += int((rank_I < k).sum())
    for start in range(0, num_texts, chunk):  # a chunk of the texts, and all images
        sim_JI = text_JD[start:start + chunk] @ image_ID.T
        own_J = sim_JI.gather(1, text_image_J[start:start + chunk, None])
        rank_J = (sim_JI > own_J).sum(1)
        for k in ks:
            t2i[k] += int((rank_J < k).sum())
    out = {f"image_to_text/R@{k}": i2t[k] / max(num_images, 1) for k in ks}
    out.update({f"text_to_image/R@{k}": t2i[k] / max(num_texts, 1) for k in ks})
    return out


def _caption_tokens(captions: Any, tokenize: Tokenize | None) -> tuple[torch.Tensor, list[int]]:
    """Captions of one batch -> (tokens [J, T], number of captions per image)."""
    if isinstance(captions, torch.Tensor):  # [B, T] or [B, n, T] already tokenized
        per_image = captions.shape[1] if captions.dim() == 3 else 1
        return captions.reshape(-1, captions.shape[-1]), [per_image] * captions.shape[0]
    if tokenize is None:
        raise ValueError("captions are strings: pass a tokenize function")
    groups = [[c] if isinstance(c, str) else list(c) for c in captions]
    return tokenize([c for group in groups for c in group]), [len(group) for group in groups]


def pair_embeddings(model: nn.Module, loader: Iterable, tokenize: Tokenize | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image embeddings [I, D], text embeddings [J, D], the image of each text [J]) of (images,
    captions) batches; captions per image: a string, a list of strings, or tokens."""
    images, texts, owners = [], [], []
    with _eval_mode(model) as device:
        for batch in loader:
            pixels, captions = _pair(batch, "text")
            tokens_JT, counts = _caption_tokens(captions, tokenize)
            offset = sum(z.shape[0] for z in images)
            images.append(F.normalize(model.encode_image(pixels.to(device)), dim=-1))
            texts.append(F.normalize(model.encode_text(tokens_JT.to(device)), dim=-1))
            owners.append(torch.repeat_interleave(torch.arange(len(counts)) + offset, torch.tensor(counts)))
    return torch.cat(images), torch.cat(texts), torch.cat(owners).to(device)


def retrieval(model: nn.Module, loader: Iterable, tokenize: Tokenize | None = None,
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k over (images, captions) batches; captions per image: a string, a list of strings, or tokens."""
    return retrieval_from_embeddings(*pair_embeddings(model, loader, tokenize), ks)


@renamed_arguments(image_ND="image_BD", text_ND="text_BD")
def contrastive_loss_from_embeddings(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: float,
                                     batch_size: int = 128, seed: int = 0) -> float:
    """CLIP's softmax loss ((CE over images + CE over texts) / 2, pair i's texts and image positive) averaged over
    fixed batches: the pairs in a fixed shuffle (by `seed`), cut into batch_size pairs (the remainder left
    out, one smaller batch when there are fewer). Every model is scored on the same batches, so the number
    compares models with little noise; a batch's size sets the loss's scale (log batch_size at chance)."""
    check_finite(image_BD, "image embeddings"), check_finite(text_BD, "text embeddings")
    if image_BD.shape != text_BD.shape:
        raise ValueError(f"the loss needs one text per image, got {image_BD.shape[0]} images, {text_BD.shape[0]} "
                         f"texts")
    n = image_BD.shape[0]
    order_B = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(image_BD.device)
    size = min(batch_size, n)
    losses = []
    for start in range(0, n - size + 1, size):
        idx = order_B[start:start + size]
        logits_BB = logit_scale * image_BD[idx].float() @ text_BD[idx].float().T
        labels_B = torch.arange(size, device=logits_BB.device)
        losses.append((F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B)) / 2)
    return float(torch.stack(losses).mean())


# -- k-shot linear probe --------------------------------------------------------------------------------------
@renamed_arguments(x_ND="x_BD", labels_N="labels_B")
def fit_ridge(x_BD: torch.Tensor, labels_B: torch.Tensor, num_classes: int, l2: float = 1e-2
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression onto +-1 class targets (big_vision's few-shot probe): (W [D, Y], b [Y]).

    The bias is fitted by centring, so it is not regularised.
    """
    x = x_BD.double()
    y = F.one_hot(labels_B.long(), num_classes).double() * 2 - 1
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    gram_DD = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w_DY = torch.linalg.solve(gram_DD, xc.T @ (y - mean_y))
    return w_DY.to(x_BD.dtype), (mean_y - mean_x @ w_DY).to(x_BD.dtype)


@renamed_arguments(train_ND="train_BD", train_labels_N="train_labels_B")
def linear_probe_from_embeddings(train_BD: torch.Tensor, train_labels_B: torch.Tensor,
                                 test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                                 l2: float = 1e-2) -> dict[str, float]:
    """{"accuracy", "balanced_accuracy" (mean recall over the classes present in the test set)}."""
    w_DY, b_Y = fit_ridge(check_finite(train_BD, "image embeddings"), train_labels_B, num_classes, l2)
    correct_Y = torch.zeros(num_classes, dtype=torch.long)
    count_Y = torch.zeros(num_classes, dtype=torch.long)
    for x_BD, labels_B in test_batches:
        check_finite(x_BD, "image embeddings")
        labels_B = torch.as_tensor(labels_B).cpu().long()
        hit_B = (x_BD.to(w_DY) @ w_DY + b_Y).argmax(1).cpu() == labels_B
        correct_Y += torch.bincount(labels_B[hit_B], minlength=num_classes)
        count_Y += torch.bincount(labels_B, minlength=num_classes)
    present = count_Y > 0
    recall_Y = correct_Y[present].double() / count_Y[present]
    return {"accuracy": int(correct_Y.sum()) / max(int(count_Y.sum()), 1),
            "balanced_accuracy": float(recall_Y.mean()) if present.any() else 0.0}


def select_shots(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], shots: int, num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `shots` examples of every class in stream order (the loader's order decides which)."""
    taken = [0] * num_classes
    xs, ys = [], []
    for x_BD, labels_B in batches:
        labels_B = torch.as_tensor(labels_B).cpu()
        keep = []
        for i, label in enumerate(labels_B.tolist()):
            if taken[label] < shots:
                taken[label] += 1
                keep.append(i)
        if keep:
            xs.append(x_BD[keep].cpu())
            ys.append(labels_B[keep])
        if min(taken) >= shots:
            break
    if not xs:
        raise ValueError("the training stream had no examples")
    return torch.cat(xs), torch.cat(ys)


def few_shot_linear_probe(model: nn.Module, train_loader: Iterable, test_loader: Iterable, num_classes: int,
                          shots: int = 10, l2: float = 1e-2) -> dict[str, float]:
    """k-shot (default 10) linear probe on frozen, normalised image embeddings; returns {"accuracy"}."""
    # closing(): select_shots stops early, and the generator must then leave eval mode at once.
    with contextlib.closing(image_embeddings(model, train_loader)) as train:
        train_BD, train_labels_B = select_shots(train, shots, num_classes)
    test = ((z.cpu(), y) for z, y in image_embeddings(model, test_loader))
    return linear_probe_from_embeddings(train_BD, train_labels_B, test, num_classes, l2)


@renamed_arguments(labels_N="labels_B")
def k_shot_split(labels_B: torch.Tensor, shots: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (train [Y * shots], test) and new labels [B] for a k-shot probe on one labelled set.

    Only classes with more than `shots` examples take part (each needs at least one test example); they are
    renumbered 0..Y-1 in label order and the others get -1. Which examples are the shots is a seeded draw.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels_B = torch.as_tensor(labels_B).long().cpu()
    gen = torch.Generator().manual_seed(seed)
    new_B = torch.full_like(labels_B, -1)
    train, test = [], []
    for label in labels_B.unique().tolist():
        members = (labels_B == label).nonzero().flatten()
        if len(members) <= shots:
            continue
        new_B[members] = int(new_B.max()) + 1
        members = members[torch.randperm(len(members), generator=gen)]
        train.append(members[:shots])
        test.append(members[shots:])
    if not train:
        raise ValueError(f"no class has more than {shots} examples: a {shots}-shot probe needs at least one test "
                         f"example per class")
    return torch.cat(train), torch.cat(test), new_B
