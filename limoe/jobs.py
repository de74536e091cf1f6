"""What `limoe eval`, `limoe classify` and `limoe embed` do with a trained checkpoint.

Each job takes plain arguments and returns plain data; the command line (cli.py) only parses and prints.
User mistakes (missing files, unreadable images, an empty label list) raise JobError with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from limoe.checkpoint import CheckpointError, load_checkpoint
from limoe.errors import UserError
from limoe.evaluate import NonFiniteEmbeddings, check_finite, class_embeddings


class JobError(UserError, ValueError):
    """A user-facing error of a job; its message is the one line the command line prints."""


@contextlib.contextmanager
def _finite_or_job_error():
    try:
        yield
    except NonFiniteEmbeddings as e:
        raise JobError(str(e)) from None


def _load(checkpoint: str, device: str):
    try:
        return load_checkpoint(checkpoint, device=device)
    except CheckpointError as e:
        raise JobError(str(e)) from None


# -- classify -------------------------------------------------------------------------------------------------
def load_images(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """[N, 3, S, S] evaluation-transformed images; a missing or unreadable file is a one-line JobError."""
    from limoe.data import ImageConfig, ImageTransform
    from limoe.data.stats import SkipError

    transform = ImageTransform(ImageConfig(image_size=image_size), train=False)
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise JobError(f"image not found: {path}")
        try:
            with open(path, "rb") as f:
                images.append(transform.from_bytes(f.read(), None))
        except SkipError as e:
            raise JobError(f"cannot read image {path}: {str(e.reason).replace('_', ' ')}") from None
    return torch.stack(images)


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"cat,dog" or a file with one label per line (given as @path) -> label list."""
    if isinstance(labels, str):
        if labels.startswith("@"):
            path = labels[1:]
            if not os.path.isfile(path):
                raise JobError(f"labels file not found: {path}")
            items = Path(path).read_text(encoding="utf-8").splitlines()
        else:
            items = labels.split(",")
    else:
        items = list(labels)
    items = [label.strip() for label in items if label.strip()]
    if len(items) < 2:
        raise JobError(f"--labels needs at least two labels (comma-separated), got {items}")
    return items


def classify(checkpoint: str, images: Sequence[str], labels: str | Sequence[str],
             templates: Sequence[str] | None = None, top: int = 3, device: str = "cpu") -> list[dict]:
    """Zero-shot labels for each image, in order: {"image", "labels": [(label, probability), ...] best first},
    or {"image", "error"} for an image that cannot be read (the others are still classified)."""
    from limoe.data.builtin import TEMPLATES
    from limoe.train.evaluation import tokenize_fn

    names = parse_labels(labels)
    if not images:
        raise JobError("no images given")
    model, tokenizer, _ = _load(checkpoint, device)
    out, pixels = [], []
    for path in images:
        try:
            pixels.append(load_images([path], model.config.image_size)[0])
            out.append({"image": path})
        except JobError as e:
            out.append({"image": path, "error": str(e)})
    if not pixels:
        raise JobError(out[0]["error"] if len(out) == 1 else f"none of the {len(out)} images could be read "
                                                              f"(first: {out[0]['error']})")
    with _finite_or_job_error(), torch.no_grad():
        class_CD = class_embeddings(model, names, tokenize_fn(tokenizer), list(templates or TEMPLATES))
        z_ND = check_finite(model.encode_image(torch.stack(pixels).to(device), normalize=True), "image embeddings")
        probs_NC = (model.logit_scale.exp() * z_ND @ class_CD.T).softmax(-1)
    readable = [r for r in out if "error" not in r]
    for r, p_C in zip(readable, probs_NC):
        best = p_C.topk(min(top, len(names)))
        r["labels"] = [(names[i], float(p)) for p, i in zip(best.values, best.indices)]
    return out


# -- eval -----------------------------------------------------------------------------------------------------
def evaluate_checkpoint(checkpoint: str, zero_shot_dir: str | None = None, class_names: str | None = None,
                        templates: str | None = None, retrieval_csv: str | None = None,
                        probe_train: str | None = None, probe_test: str | None = None, shots: int = 10,
                        batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """Zero-shot on an image folder (default: the held-out concepts of the run's corpus or built-in data),
    retrieval on a CSV of pairs (default: their test split), and a k-shot linear probe when two image folders
    are given."""
    from limoe import evaluate
    from limoe.data import CsvPairs, ImageConfig, ImageFolder, LoaderConfig, make_loader
    from limoe.train import evaluation
    from limoe.train.data import held_out_pairs, held_out_zero_shot

    model, tokenizer, config = _load(checkpoint, device)
    image = ImageConfig(image_size=model.config.image_size)
    one = dict(rank=0, world_size=1)
    metrics: dict[str, float] = {}
    try:
        if zero_shot_dir:
            root = Path(zero_shot_dir)
            if not root.is_dir():
                raise JobError(f"zero-shot folder not found: {root}")
            names_file = class_names or (root / "classnames.txt" if (root / "classnames.txt").is_file() else None)
            templates_file = templates or (root / "templates.txt" if (root / "templates.txt").is_file() else None)
            ds = ImageFolder(root, names_file, templates_file, image=image, **one)
            zs = (ds, ds.class_names, ds.templates)
        else:
            zs = held_out_zero_shot(config, image, **one)  # the run's corpus, else the built-in dataset
        metrics.update(evaluation.zero_shot(model, tokenizer, *zs, batch_size=batch_size))
        if retrieval_csv:
            pairs = CsvPairs(retrieval_csv, image=image, **one)
        else:
            pairs = held_out_pairs(config, image, **one)
        metrics.update(evaluation.retrieval(model, tokenizer, pairs, batch_size))
        if probe_train or probe_test:
            if not (probe_train and probe_test):
                raise JobError("the linear probe needs both --probe-train and --probe-test image folders")
            train_ds = ImageFolder(probe_train, image=image, **one)
            test_ds = ImageFolder(probe_test, image=image, **one)
            loader = LoaderConfig(batch_size=batch_size, num_workers=0)
            probe = evaluate.few_shot_linear_probe(model, make_loader(train_ds, loader), make_loader(test_ds, loader),
                                                   num_classes=len(train_ds.class_names), shots=shots)
            metrics[f"linear_probe/{shots}shot_accuracy"] = probe["accuracy"]
    except (FileNotFoundError, KeyError, ValueError) as e:  # incl. NoValidSamplesError, JobError
        raise JobError(str(e).strip("'\"")) from None
    return metrics


def metrics_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics) + 2
    return "\n".join([f"{'metric':<{width}}{'value':>9}"] +
                     [f"{k:<{width}}{100 * v:>8.2f}%" for k, v in metrics.items()])


# -- embed ----------------------------------------------------------------------------------------------------
def embed(checkpoint: str, output: str, images: Sequence[str] = (), texts: Sequence[str] = (),
          batch_size: int = 256, device: str = "cpu") -> tuple[str, tuple[int, ...]]:
    """Normalised image or text embeddings [N, D] to a .npy or .safetensors file (key "embeddings")."""
    if bool(images) == bool(texts):
        raise JobError("give either images or texts to embed (not both, not neither)")
    suffix = Path(output).suffix
    if suffix not in (".npy", ".safetensors"):
        raise JobError(f"output must end in .npy or .safetensors, got {output!r}")
    model, tokenizer, _ = _load(checkpoint, device)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images or texts), batch_size):
            if images:
                pixels = load_images(images[start:start + batch_size], model.config.image_size).to(device)
                chunks.append(model.encode_image(pixels, normalize=True).cpu())
            else:
                ids_BL = tokenizer(list(texts[start:start + batch_size])).ids_BL
                chunks.append(model.encode_text(ids_BL.to(device), normalize=True).cpu())
    with _finite_or_job_error():
        z_ND = check_finite(torch.cat(chunks).float().contiguous(), "embeddings")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        import numpy as np

        np.save(output, z_ND.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": z_ND}, output, metadata={"kind": "image" if images else "text",
                                                          "items": json.dumps(list(images or texts))})
    return output, tuple(z_ND.shape)
