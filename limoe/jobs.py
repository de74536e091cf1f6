"""What `limoe eval`, `limoe classify` and `limoe embed` do with a trained checkpoint.

Each job takes plain arguments and returns plain data; the command line (cli.py) only parses and prints.
User mistakes (missing files, unreadable images, an empty label list) raise JobError with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from limoe.checkpoint import CheckpointError
from limoe.errors import UserError
from limoe.evaluate import NonFiniteEmbeddings, check_finite, class_embeddings
from limoe.factory import load_checkpoint


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
    """[B, 3, H, W] evaluation-transformed images (H = W = image_size); a missing or unreadable file is a one-line
    JobError."""
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
            from limoe.data.image_folder import read_lines

            items = read_lines(path)  # UTF-8 (a BOM dropped), or one line saying why not
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
    from limoe.train.held_out import tokenize_fn

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
        class_YD = class_embeddings(model, names, tokenize_fn(tokenizer), list(templates or TEMPLATES))
        z_BD = check_finite(model.encode_image(torch.stack(pixels).to(device), normalize=True), "image embeddings")
        probs_BY = (model.logit_scale.exp() * z_BD @ class_YD.T).softmax(-1)
    readable = [r for r in out if "error" not in r]
    for r, p_Y in zip(readable, probs_BY):
        best = p_Y.topk(min(top, len(names)))
        r["labels"] = [(names[i], float(p)) for p, i in zip(best.values, best.indices)]
    return out


# -- eval -----------------------------------------------------------------------------------------------------
BUILT_IN_DATA = {"corpus": "the built-in corpus", "builtin": "the built-in OpenMoji set"}


def run_config(checkpoint: str):
    """The TrainConfig a checkpoint was trained with (its config.json), without loading any weights."""
    from limoe import checkpoint as ckpt
    from limoe.train.config import TrainConfig

    try:
        file = ckpt.resolve(checkpoint) / "config.json"
        data = ckpt.read_json(file)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    try:
        return TrainConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise JobError(f"{file}: unreadable config ({e})") from None


def evaluation_plan(config, zero_shot_dir: str | None = None, retrieval_csv: str | None = None,
                    probe_train: str | None = None, probe_test: str | None = None, shots: int = 10) -> str:
    """What `limoe eval` scores, in words; a JobError, before anything is loaded, for what cannot be scored. A run
    trained on the user's own data (csv, wds) has no held-out set limoe knows of: without --zero-shot,
    --retrieval or a probe it is refused, never scored on built-in data."""
    if (probe_train or probe_test) and not (probe_train and probe_test):
        raise JobError("the linear probe needs both --probe-train and --probe-test image folders")
    from limoe.data.zero_shot import is_shard_pattern

    if zero_shot_dir and not (is_shard_pattern(zero_shot_dir) or Path(zero_shot_dir).is_dir()):
        raise JobError(f"zero-shot folder not found: {zero_shot_dir}")
    probe = (probe_train, probe_test) if probe_train else None
    built_in = BUILT_IN_DATA.get(config.data.source)
    if not (built_in or zero_shot_dir or retrieval_csv or probe):
        own = [f"--zero-shot {config.eval.zero_shot_dir}" if config.eval.zero_shot_dir else "",
               f"--retrieval {config.eval.retrieval_csv}" if config.eval.retrieval_csv else ""]
        hint = f" (its training evaluated on {' '.join(filter(None, own))})" if any(own) else ""
        raise JobError(f"this run trained on data.source={config.data.source} ({config.data.train}), which has no "
                       f"held-out set limoe knows: pass --zero-shot DIR (image folder, one sub-folder per class) "
                       f"and/or --retrieval pairs.csv{hint}")
    parts = []
    if zero_shot_dir:
        parts.append(f"zero-shot on {zero_shot_dir}")
    elif built_in:
        seen = " and its seen concepts in unseen renderings" if config.data.source == "corpus" else ""
        parts.append(f"zero-shot on the held-out concepts of {built_in}{seen}")
    if retrieval_csv:
        parts.append(f"retrieval on {retrieval_csv}")
    elif built_in:
        parts.append(f"retrieval on the test pairs of {built_in}")
    if probe:
        parts.append(f"a {shots}-shot linear probe ({probe[0]} -> {probe[1]})")
    return ", ".join(parts)


class Metrics(dict):
    """Metric name -> value (what `-o` writes), with the chance level of the metrics that have one."""

    def __init__(self, values=(), chance: dict[str, float] | None = None):
        super().__init__(values)
        self.chance = dict(chance or {})


def evaluate_checkpoint(checkpoint: str, zero_shot_dir: str | None = None, class_names: str | None = None,
                        templates: str | None = None, retrieval_csv: str | None = None,
                        probe_train: str | None = None, probe_test: str | None = None, shots: int = 10,
                        batch_size: int = 256, device: str = "cpu",
                        progress: Callable[[str], None] | None = None,
                        capacity_factor: float | None = None, csv: dict[str, str] | None = None) -> Metrics:
    """Zero-shot on an image folder (default: the held-out concepts of the run's corpus or built-in data),
    retrieval on a CSV of pairs (default: their test split), and a k-shot linear probe when two image folders
    are given. A run trained on its own data (csv, wds) needs the folder or the CSV (evaluation_plan).
    `progress` gets a line as each part starts (the command line prints them to stderr); `capacity_factor`
    replaces the MoE layers' evaluation capacity factor; `csv` ({"csv_img_key": ..., "csv_caption_key": ...,
    "csv_separator": ...}, any of them) the columns and the separator of `retrieval_csv`, by default the run's
    `data.csv_*`."""
    from limoe import evaluate
    from limoe.data import CsvPairs, ImageConfig, ImageFolder, LoaderConfig, make_loader
    from limoe.data.zero_shot import zero_shot_set
    from limoe.train.held_out import EvalSets, held_out, sized
    from limoe.train.data import held_out_pairs, held_out_zero_shot

    progress = progress or (lambda line: None)
    evaluation_plan(run_config(checkpoint), zero_shot_dir, retrieval_csv, probe_train, probe_test, shots)
    model, tokenizer, config = _load(checkpoint, device)
    if capacity_factor is not None:
        from limoe.moe.layer import set_eval_capacity_factor

        try:
            set_eval_capacity_factor(model, capacity_factor)
        except ValueError as e:
            raise JobError(f"--capacity-factor: {e}") from None
    built_in = config.data.source in BUILT_IN_DATA
    image = ImageConfig(image_size=model.config.image_size)
    one = dict(rank=0, world_size=1)
    sets = EvalSets()
    start = time.perf_counter()
    try:
        progress("reading the evaluation data")
        if zero_shot_dir:
            ds = zero_shot_set(zero_shot_dir, class_names, templates, image=image, **one)
            sets.zero_shot = (ds, ds.class_names, ds.templates)
        elif built_in:  # the run's corpus (held-out concepts, and seen concepts in unseen renderings), or built-in set
            sets.zero_shot = held_out_zero_shot(config, image, **one)
            sets.seen = held_out_zero_shot(config, image, split="seen", **one)
        if retrieval_csv:
            columns = {k: getattr(config.data, k) for k in ("csv_img_key", "csv_caption_key", "csv_separator")}
            columns.update(csv or {})
            sets.retrieval = CsvPairs(retrieval_csv, columns["csv_img_key"], columns["csv_caption_key"],
                                      columns["csv_separator"], image=image, **one)
        elif built_in:
            sets.retrieval = held_out_pairs(config, image, **one)
        metrics = Metrics(*held_out(model, tokenizer, sets, batch_size, config.eval.loss_batch, progress))
        if probe_train:
            train_ds = ImageFolder(probe_train, image=image, **one)
            test_ds = ImageFolder(probe_test, image=image, **one)
            progress(f"linear probe: {shots} shots of {len(train_ds.class_names):,} classes, tested on "
                     f"{sized(test_ds, 'images')}")
            loader = LoaderConfig(batch_size=batch_size, num_workers=0)
            result = evaluate.few_shot_linear_probe(model, make_loader(train_ds, loader), make_loader(test_ds, loader),
                                                    num_classes=len(train_ds.class_names), shots=shots)
            metrics[f"linear_probe/{shots}shot_accuracy"] = result["accuracy"]
    except (FileNotFoundError, KeyError, ValueError) as e:  # incl. NoValidSamplesError, JobError
        raise JobError(str(e).strip("'\"")) from None
    progress(f"evaluated in {time.perf_counter() - start:.0f} s")
    return metrics


def metrics_table(metrics: dict[str, float], chance: dict[str, float] | None = None) -> str:
    """One row per metric: shares as percentages (with their chance level where known), losses as numbers."""
    from limoe.train.logger import metric_row

    chance = getattr(metrics, "chance", {}) if chance is None else chance
    if not metrics:
        return "no metrics"
    width = max(len(k) for k in metrics) + 2
    rows = (metric_row(key, key, value, chance.get(key), width) for key, value in metrics.items())
    return "\n".join([f"{'metric':<{width}}{'value':>9}{'chance':>9}", *rows])


# -- embed ----------------------------------------------------------------------------------------------------
def read_texts(path: str) -> list[str]:
    """The texts of a file, one per line, row i of the output being line i + 1. A blank line is refused (naming
    it), so that rows never shift against lines; blank lines at the end of the file are ignored."""
    if not os.path.isfile(path):
        raise JobError(f"texts file not found: {path}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise JobError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise JobError(f"{path}: line {blank[0]} is blank{more}: every line is one text to embed (remove it)")
    return lines


def inputs_path(output: str) -> str:
    """Where a .npy output's inputs are listed (a .safetensors output keeps them in its metadata)."""
    return str(Path(output).with_suffix(".inputs.json"))


def embed(checkpoint: str, output: str, images: Sequence[str] = (), texts: Sequence[str] = (),
          batch_size: int = 256, device: str = "cpu") -> tuple[str, tuple[int, ...]]:
    """L2-normalised image or text embeddings [B, D] (row i: input i) to a .npy or .safetensors file (key
    "embeddings"). The inputs in row order go with them: in the safetensors metadata ("kind", "items"), or for
    .npy in inputs_path(output). An empty text is refused: its embedding would be the padding's alone."""
    if bool(images) == bool(texts):
        raise JobError("give either images or texts to embed (not both, not neither)")
    empty = [i for i, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise JobError(f"text {empty[0]} of {len(texts)} is empty: give only non-empty texts")
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
                ids_BT = tokenizer(list(texts[start:start + batch_size])).ids_BT
                chunks.append(model.encode_text(ids_BT.to(device), normalize=True).cpu())
    with _finite_or_job_error():
        z_BD = check_finite(torch.cat(chunks).float().contiguous(), "embeddings")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    inputs = {"kind": "image" if images else "text", "normalized": "l2", "checkpoint": str(checkpoint),
              "items": list(images or texts)}
    if suffix == ".npy":
        import numpy as np

        np.save(output, z_BD.numpy())
        Path(inputs_path(output)).write_text(json.dumps(inputs, indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": z_BD}, output, metadata={k: v if isinstance(v, str) else json.dumps(v)
                                                          for k, v in inputs.items()})
    return output, tuple(z_BD.shape)
