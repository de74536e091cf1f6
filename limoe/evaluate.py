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


def _topk_hits(scores_NC: torch.Tensor, labels_N: torch.Tensor, topk: Sequence[int]) -> dict[int, int]:
    k_max = min(max(topk), scores_NC.shape[1])
    hit_NK = scores_NC.topk(k_max, dim=1).indices == labels_N[:, None]
    return {k: int(hit_NK[:, :k].any(1).sum()) for k in topk}


# -- zero-shot classification ---------------------------------------------------------------------------------
def class_embeddings(model: nn.Module, classnames: Sequence[str], tokenize: Tokenize,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the normalised text embeddings of its prompts."""
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
            z_PD = F.normalize(model.encode_text(tokenize(prompts).to(device)), dim=-1)
            out.append(F.normalize(z_PD.view(len(names), len(templates), -1).mean(1), dim=-1))
    return torch.cat(out)


def zero_shot_hits(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], class_embeds_CD: torch.Tensor,
                   topk: Sequence[int] = (1, 5)) -> tuple[dict[int, int], int]:
    """({k: images whose class is among their k nearest class embeddings}, images) over (image_embeds [B, D],
    labels [B]) batches: counts, so that the accuracies of several subsets pool exactly."""
    hits = dict.fromkeys(topk, 0)
    count = 0
    check_finite(class_embeds_CD, "class embeddings")
    for image_BD, labels_B in batches:
        check_finite(image_BD, "image embeddings")
        for k, h in _topk_hits(image_BD @ class_embeds_CD.T.to(image_BD), labels_B.to(image_BD.device),
                               topk).items():
            hits[k] += h
        count += labels_B.shape[0]
    return hits, count


def zero_shot_from_embeddings(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], class_embeds_CD: torch.Tensor,
                              topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of nearest-class-embedding prediction over (image_embeds [B, D], labels [B]) batches."""
    hits, count = zero_shot_hits(batches, class_embeds_CD, topk)
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
    class_CD = class_embeddings(model, classnames, tokenize, templates)
    return zero_shot_from_embeddings(((z, torch.as_tensor(y)) for z, y in image_embeddings(model, loader)),
                                     class_CD, topk)


# -- retrieval ------------------------------------------------------------------------------------------------
def retrieval_from_embeddings(image_ND: torch.Tensor, text_MD: torch.Tensor, text_image_M: torch.Tensor,
                              ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways; text m describes image text_image_M[m], an image may have several texts.

    image->text: an image counts as found at k if any of its texts is among its k most similar texts;
    text->image: a text counts if its image is among its k most similar images. Ties rank in the query's favour.
    """
    check_finite(image_ND, "image embeddings"), check_finite(text_MD, "text embeddings")
    text_image_M = text_image_M.to(image_ND.device).long()
    n, m = image_ND.shape[0], text_MD.shape[0]
    i2t = dict.fromkeys(ks, 0)
    t2i = dict.fromkeys(ks, 0)
    for start in range(0, n, chunk):
        sim_nM = image_ND[start:start + chunk] @ text_MD.T
        own_nM = text_image_M[None, :] == torch.arange(start, start + sim_nM.shape[0], device=image_ND.device)[:, None]
        best_n = sim_nM.masked_fill(~own_nM, float("-inf")).amax(1)
        rank_n = (sim_nM > best_n[:, None]).sum(1)  # texts strictly better than the best own text
        for k in ks:
            i2t[k] += int((rank_n < k).sum())
    for start in range(0, m, chunk):
        sim_mN = text_MD[start:start + chunk] @ image_ND.T
        own_m = sim_mN.gather(1, text_image_M[start:start + chunk, None])
        rank_m = (sim_mN > own_m).sum(1)
        for k in ks:
            t2i[k] += int((rank_m < k).sum())
    out = {f"image_to_text/R@{k}": i2t[k] / max(n, 1) for k in ks}
    out.update({f"text_to_image/R@{k}": t2i[k] / max(m, 1) for k in ks})
    return out


def _caption_tokens(captions: Any, tokenize: Tokenize | None) -> tuple[torch.Tensor, list[int]]:
    """Captions of one batch -> (tokens [M, T], number of captions per image)."""
    if isinstance(captions, torch.Tensor):  # [B, T] or [B, n, T] already tokenized
        per_image = captions.shape[1] if captions.dim() == 3 else 1
        return captions.reshape(-1, captions.shape[-1]), [per_image] * captions.shape[0]
    if tokenize is None:
        raise ValueError("captions are strings: pass a tokenize function")
    groups = [[c] if isinstance(c, str) else list(c) for c in captions]
    return tokenize([c for group in groups for c in group]), [len(group) for group in groups]


def pair_embeddings(model: nn.Module, loader: Iterable, tokenize: Tokenize | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image embeddings [N, D], text embeddings [M, D], the image of each text [M]) of (images,
    captions) batches; captions per image: a string, a list of strings, or tokens."""
    images, texts, owners = [], [], []
    with _eval_mode(model) as device:
        for batch in loader:
            pixels, captions = _pair(batch, "text")
            tokens_MT, counts = _caption_tokens(captions, tokenize)
            offset = sum(z.shape[0] for z in images)
            images.append(F.normalize(model.encode_image(pixels.to(device)), dim=-1))
            texts.append(F.normalize(model.encode_text(tokens_MT.to(device)), dim=-1))
            owners.append(torch.repeat_interleave(torch.arange(len(counts)) + offset, torch.tensor(counts)))
    return torch.cat(images), torch.cat(texts), torch.cat(owners).to(device)


def retrieval(model: nn.Module, loader: Iterable, tokenize: Tokenize | None = None,
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k over (images, captions) batches; captions per image: a string, a list of strings, or tokens."""
    return retrieval_from_embeddings(*pair_embeddings(model, loader, tokenize), ks)


def contrastive_loss_from_embeddings(image_ND: torch.Tensor, text_ND: torch.Tensor, logit_scale: float,
                                     batch_size: int = 128, seed: int = 0) -> float:
    """CLIP's softmax loss ((CE over images + CE over texts) / 2, pair i's texts and image positive) averaged over
    fixed batches: the pairs in a fixed shuffle (by `seed`), cut into batch_size pairs (the remainder left
    out, one smaller batch when there are fewer). Every model is scored on the same batches, so the number
    compares models with little noise; a batch's size sets the loss's scale (log batch_size at chance)."""
    check_finite(image_ND, "image embeddings"), check_finite(text_ND, "text embeddings")
    if image_ND.shape != text_ND.shape:
        raise ValueError(f"the loss needs one text per image, got {image_ND.shape[0]} images, {text_ND.shape[0]} "
                         f"texts")
    n = image_ND.shape[0]
    order_N = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(image_ND.device)
    size = min(batch_size, n)
    losses = []
    for start in range(0, n - size + 1, size):
        idx = order_N[start:start + size]
        logits_BB = logit_scale * image_ND[idx].float() @ text_ND[idx].float().T
        labels_B = torch.arange(size, device=logits_BB.device)
        losses.append((F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B)) / 2)
    return float(torch.stack(losses).mean())


# -- k-shot linear probe --------------------------------------------------------------------------------------
def fit_ridge(x_ND: torch.Tensor, labels_N: torch.Tensor, num_classes: int, l2: float = 1e-2
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression onto +-1 class targets (big_vision's few-shot probe): (W [D, C], b [C]).

    The bias is fitted by centring, so it is not regularised.
    """
    x = x_ND.double()
    y = F.one_hot(labels_N.long(), num_classes).double() * 2 - 1
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    gram_DD = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w_DC = torch.linalg.solve(gram_DD, xc.T @ (y - mean_y))
    return w_DC.to(x_ND.dtype), (mean_y - mean_x @ w_DC).to(x_ND.dtype)


def linear_probe_from_embeddings(train_ND: torch.Tensor, train_labels_N: torch.Tensor,
                                 test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                                 l2: float = 1e-2) -> dict[str, float]:
    """{"accuracy", "balanced_accuracy" (mean recall over the classes present in the test set)}."""
    w_DC, b_C = fit_ridge(check_finite(train_ND, "image embeddings"), train_labels_N, num_classes, l2)
    correct_C = torch.zeros(num_classes, dtype=torch.long)
    count_C = torch.zeros(num_classes, dtype=torch.long)
    for x_BD, labels_B in test_batches:
        check_finite(x_BD, "image embeddings")
        labels_B = torch.as_tensor(labels_B).cpu().long()
        hit_B = (x_BD.to(w_DC) @ w_DC + b_C).argmax(1).cpu() == labels_B
        correct_C += torch.bincount(labels_B[hit_B], minlength=num_classes)
        count_C += torch.bincount(labels_B, minlength=num_classes)
    present = count_C > 0
    recall_C = correct_C[present].double() / count_C[present]
    return {"accuracy": int(correct_C.sum()) / max(int(count_C.sum()), 1),
            "balanced_accuracy": float(recall_C.mean()) if present.any() else 0.0}


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
        train_ND, train_N = select_shots(train, shots, num_classes)
    test = ((z.cpu(), y) for z, y in image_embeddings(model, test_loader))
    return linear_probe_from_embeddings(train_ND, train_N, test, num_classes, l2)


def k_shot_split(labels_N: torch.Tensor, shots: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (train [C * shots], test) and new labels [N] for a k-shot probe on one labelled set.

    Only classes with more than `shots` examples take part (each needs at least one test example); they are
    renumbered 0..C-1 in label order and the others get -1. Which examples are the shots is a seeded draw.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels_N = torch.as_tensor(labels_N).long().cpu()
    gen = torch.Generator().manual_seed(seed)
    new_N = torch.full_like(labels_N, -1)
    train, test = [], []
    for label in labels_N.unique().tolist():
        members = (labels_N == label).nonzero().flatten()
        if len(members) <= shots:
            continue
        new_N[members] = int(new_N.max()) + 1
        members = members[torch.randperm(len(members), generator=gen)]
        train.append(members[:shots])
        test.append(members[shots:])
    if not train:
        raise ValueError(f"no class has more than {shots} examples: a {shots}-shot probe needs at least one test "
                         f"example per class")
    return torch.cat(train), torch.cat(test), new_N
