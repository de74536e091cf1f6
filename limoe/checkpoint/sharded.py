"""Sharded checkpoints: every rank writes its own shards with `torch.distributed.checkpoint` (DCP); no rank ever
holds the whole model or optimizer state. Expert-parallel and FSDP2 runs save this way.

A sharded checkpoint is the usual folder (`format.py`) with `sharded/` in place of `model.safetensors` and
the optimizer tensors: a safetensors file per rank holding its pieces, each file's header naming every piece's
offset in its global tensor (DCP's safetensors storage: nothing is pickled, so reading a checkpoint never runs
code from it, unlike DCP's default format), and `index.json`, which rank 0 writes last and which lists them.
`optimizer.safetensors` keeps rank 0's RNG state. DCP keys: "model.<state-dict key>" (the single-process keys)
and "optim.<parameter name>.<name>" (AdamW's step and moments); `state.json` lists the parameter names in the
optimizer's order.

Each tensor is stored with its global shape and this rank's offset, so the checkpoint loads under any layout:
another number of ranks, with or without expert parallelism or FSDP (DCP reshards on load), and in one process,
where `read_full` reads it into the single-process layout (`limoe eval`, `classify`, ... read it so; `export`
writes it as a plain single-folder checkpoint). Written atomically like every checkpoint: into a `.tmp-*`
folder that rank 0 renames into place after every rank has finished.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from limoe.checkpoint.folder import checkpoints_dir
from limoe.checkpoint.format import (SHARDED_FOLDER as FOLDER, SHARDED_INDEX as INDEX, CheckpointError, non_finite,
                                     read_json, read_state)
from limoe.checkpoint.save import prepare_root, prune, swap_in, write_metadata

# What DCP raises: its CheckpointException (every rank's error, and a BaseException, so `except Exception` misses
# it) or an OSError of the storage.
DCP_ERRORS = (Exception, CheckpointException)


def save(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], optimizer_params: list[str],
         optimizer_meta: dict[str, Any], model_config, state: dict[str, Any], config_json: str, tokenizer,
         keep_last: int | None, rank: int) -> Path:
    """Write `step_<step>` with every rank's shards of `tensors` (DTensors, or plain tensors equal on every rank).
    Collective; returns the folder on every rank."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"
    box = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        prepare_root(root)
        box = [tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root)]
    dist.broadcast_object_list(box, src=0)  # every rank writes into the same folder (a shared file system)
    tmp = Path(box[0])
    try:
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / FOLDER), save_distributed=True))
        dist.barrier()
        if rank == 0:
            shards = sorted(f.name for f in (tmp / FOLDER).glob("*.safetensors"))
            (tmp / INDEX).write_text(json.dumps({"format": "dcp-safetensors", "files": shards}, indent=1) + "\n")
            state = dict(state, optimizer=optimizer_meta, optimizer_params=optimizer_params)
            write_metadata(tmp, {}, state, config_json, model_config, tokenizer)
            swap_in(tmp, final)
            if keep_last:
                prune(run_dir, keep_last)
    except DCP_ERRORS as e:  # a full disk, a vanished folder: one line on each rank, not every rank's traceback
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot save {final}: {first_line(e)}") from None
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def read_full(path: str | Path, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer tensors "state.<idx>.<name>") of a sharded checkpoint in the single-process layout,
    read in this process alone (no collectives). `optimizer=False` reads the weights alone (eval, embed...)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(path) / FOLDER
    order = None
    if optimizer:
        names = read_json(Path(path) / "state.json").get("optimizer_params")
        if not isinstance(names, list):
            raise CheckpointError(f"{Path(path) / 'state.json'}: no optimizer_params (the optimizer's "
                                       f"parameter order): the optimizer state cannot be placed")
        order = {name: i for i, name in enumerate(names)}
    try:
        metadata = reader(path).read_metadata()
        full = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.state_dict_metadata.items()
                if isinstance(meta, TensorStorageMetadata) and (optimizer or key.startswith("model."))}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(full, storage_reader=reader(path), no_dist=True)
    except CheckpointError:
        raise
    except DCP_ERRORS as e:  # on damaged or missing files
        raise CheckpointError(f"{folder}: cannot read the sharded checkpoint ({first_line(e)})") from None
    weights = {key[len("model."):]: value for key, value in full.items() if key.startswith("model.")}
    moments = {}
    for key, value in full.items():
        if key.startswith("optim."):
            name, _, slot = key[len("optim."):].rpartition(".")
            if name not in order:
                raise CheckpointError(f"{Path(path) / 'state.json'}: optimizer_params lacks {name}")
            moments[f"state.{order[name]}.{slot}"] = value
    return weights, moments


def reader(path: str | Path) -> HuggingFaceStorageReader:
    """DCP's reader of a sharded checkpoint's shard files, after checking that the index's files are there."""
    folder = Path(path) / FOLDER
    files = read_json(Path(path) / INDEX).get("files", [])
    missing = [f for f in files if not (folder / f).is_file()]
    if missing or not files:
        raise CheckpointError(f"{folder}: incomplete sharded checkpoint (missing {', '.join(missing) or 'files'})")
    for name in files:  # before DCP, which logs a traceback of its own on every rank for a damaged file
        _check_shard(folder / name)
    return HuggingFaceStorageReader(str(folder))


def _check_shard(file: Path) -> None:
    """A safetensors shard whose header parses and whose size covers every tensor the header names."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise ValueError(f"a {length}-byte header in {size} bytes: truncated")
            header = json.loads(f.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: damaged shard ({e})") from None
    if size < 8 + length + end:
        raise CheckpointError(f"{file}: damaged shard (truncated: {size} of {8 + length + end} bytes)")


def first_line(e: Exception) -> str:
    """DCP's errors carry every rank's traceback: the line naming the actual error, for a one-line message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if ("Error" in line or "Exception" in line) and not line.startswith("File")]
    return named[-1] if named else (lines[0] if lines else type(e).__name__)


def export(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint as a single-folder one (model.safetensors + optimizer tensors) at `out`."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    if out.exists():
        raise CheckpointError(f"{out} exists: export writes a new folder")
    weights, optimizer = read_full(path)
    broken = non_finite({**weights, **optimizer})
    if broken:  # a damaged shard, exported, would pass its damage on as an undamaged-looking checkpoint
        raise CheckpointError(f"{path / FOLDER}: non-finite values in {len(broken)} tensors (first: "
                                   f"{broken[0]}); the checkpoint is unusable")
    state, rng = read_state(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    except OSError as e:  # named as the user gave it, not as the temporary folder beside it
        raise CheckpointError(f"cannot write {out}: {e.strerror}") from None
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        save_file({**rng, **optimizer}, tmp / "optimizer.safetensors")
        for name in ("state.json", "config.json", "model.json", "tokenizer.json"):
            shutil.copyfile(path / name, tmp / name)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
