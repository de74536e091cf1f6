"""Checkpoints: safetensors weights and optimizer tensors, JSON for everything else, written atomically.

One idea per module, each importing only those above it in this list (no import circle):

- `format`: what a checkpoint folder holds, `CheckpointError`, and readers of its single files;
- `folder`: a run's checkpoints folder: listing, resolving a path or "latest", its best;
- `state`: the RNG and optimizer state split into tensors and JSON, and back;
- `save`: writing a checkpoint atomically, pruning, marking the best;
- `sharded`: every rank writes its shards (expert-parallel and FSDP runs), read whole in one process, exported;
- `weights`: a checkpoint's weights (either kind) checked to fit a model.

Loading a trained model (weights, tokenizer, config) is `limoe.load_checkpoint` (limoe/factory.py), above this
package: checkpoints know the model's config, not how to build or train one. The names below are the package's
interface; `sharded` is imported on its own (`from limoe.checkpoint import sharded`), as it costs
torch.distributed.checkpoint's import.
"""

from limoe.checkpoint.folder import best_metrics, checkpoints_dir, list_checkpoints, resolve, run_dir_of
from limoe.checkpoint.format import (BACKUP_PREFIX, BEST, FILES, CheckpointError, is_sharded, non_finite,
                                     read_json, read_model_config, read_state, read_tokenizer, step_of)
from limoe.checkpoint.save import (mark_best, prepare_root, prune, save_checkpoint, swap_in, write_metadata,
                                   write_metrics)
from limoe.checkpoint.state import load_optimizer_state, optimizer_state, set_rng_state
from limoe.checkpoint.weights import checked_weights, full_tensors, load_weights, read_weights

__all__ = ["BACKUP_PREFIX", "BEST", "FILES", "CheckpointError", "best_metrics", "checked_weights", "checkpoints_dir",
           "full_tensors", "is_sharded", "list_checkpoints", "load_optimizer_state", "load_weights", "mark_best",
           "non_finite", "optimizer_state", "prepare_root", "prune", "read_json", "read_model_config", "read_state",
           "read_tokenizer", "read_weights", "resolve", "run_dir_of", "save_checkpoint", "set_rng_state", "step_of",
           "swap_in", "write_metadata", "write_metrics"]
