"""TrainConfig: nested dataclasses for one training run, named presets, and `--set a.b=value` overrides.

A run is fully described by its TrainConfig, saved as config.json in the run directory (and in every
checkpoint), so `limoe train --resume` and `limoe eval` rebuild exactly the same model and data.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from limoe.losses import LossConfig

SCHEDULES = ("cosine", "rsqrt", "constant")
SOURCES = ("builtin", "csv", "wds")


class ConfigError(ValueError):
    """A bad preset, key or value; its message is the one line the command line prints."""


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin (offline OpenMoji), csv (CsvPairs file) or wds (webdataset shards)
    train: str | None = None  # csv: path of the CSV/TSV; wds: shard pattern
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    image_size: int = 32
    batch_size: int = 128  # global batch (summed over ranks and accumulation micro-steps)
    num_workers: int = 1
    vocab_size: int = 1024  # BPE tokenizer trained on the training captions
    context_length: int = 16
    max_concepts: int | None = None  # built-in: a small subset (tests, quick runs)
    cache_dir: str | None = None  # built-in: where the rendered dataset lives (default: the limoe cache)
    augment: bool = True  # random crop + colour jitter on training images
    # The default run sees each built-in pair ~20 times; augmentation stronger than the data layer's light
    # default delays the overfitting that makes held-out zero-shot accuracy fall after ~600 steps.
    crop_scale: float = 0.6  # smallest area fraction of the random crop
    jitter: float = 0.2  # brightness / contrast / saturation factors in [1 - jitter, 1 + jitter]
    # Built-in data: decode the images once and keep them in memory (decoding costs more than a tiny model's
    # step on CPU); csv/wds sources always stream.
    in_memory: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.5  # measured on the default run: 0.5 held out slightly better than 0.1
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP's: contrastive training is noisy and 0.999 reacts too slowly
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | rsqrt | constant (after the linear warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    rsqrt_timescale: int | None = None  # rsqrt: lr * sqrt(timescale / step) after warmup; None: warmup_steps
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    accumulation: int = 1  # micro-batches per optimizer step (the batch is split, not multiplied)


@dataclass
class EvalConfig:
    interval: int = 200  # steps between evaluations; 0: only at the end
    zero_shot: bool = True  # built-in held-out concepts (or eval.zero_shot_dir)
    retrieval: bool = True  # built-in test pairs (or eval.retrieval_csv)
    zero_shot_dir: str | None = None
    retrieval_csv: str | None = None
    batch_size: int = 256


@dataclass
class DistConfig:
    # Expert-parallel size P under torchrun: each MoE layer's experts are split over groups of P ranks (the
    # world size must be a multiple of P, num_experts divisible by P); the rest of the model is data-parallel.
    expert_parallel: int = 1


@dataclass
class TrainConfig:
    model: str = "limoe-tiny"
    model_args: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides: --set model.width=96
    moe: dict[str, Any] = field(default_factory=dict)  # MoeConfig overrides: --set moe.capacity_factor=1.25
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    steps: int = 600  # the default run: ~3 minutes on 2 CPU cores; longer overfits the 3,278 built-in pairs
    seed: int = 0
    run_dir: str = ""  # "": runs/<model>-<date>-<time>, a new folder per run
    device: str = "auto"  # auto: cuda if available, else cpu
    # CPU intra-op threads. Tiny models gain little from a second thread, and OpenMP threads slow down several
    # times when the cores are shared with other processes; None: torch's default (all cores).
    threads: int | None = 1
    log_interval: int = 10  # steps between metrics lines in metrics.jsonl
    checkpoint_interval: int = 200  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    compile: bool = False  # torch.compile the model
    tensorboard: bool = False  # also log to TensorBoard (only if it is installed)
    debug_nan_at_step: int | None = None  # testing aid: make the loss NaN at this step

    def validate(self) -> "TrainConfig":
        from limoe.model.config import MOE_KEYS, ModelConfig

        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.data.batch_size >= 1, f"data.batch_size must be >= 1, got {self.data.batch_size}"),
            (self.data.source in SOURCES, f"data.source must be one of {SOURCES}, got {self.data.source!r}"),
            (self.data.source == "builtin" or self.data.train,
             f"data.source={self.data.source} needs data.train (a CSV path or a shard pattern)"),
            (self.optim.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got "
                                               f"{self.optim.schedule!r}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}"),
            (self.optim.accumulation >= 1, f"optim.accumulation must be >= 1, got {self.optim.accumulation}"),
            (self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}"),
            (self.checkpoint_interval >= 0, f"checkpoint_interval must be >= 0, got {self.checkpoint_interval}"),
            (self.dist.expert_parallel >= 1, f"dist.expert_parallel must be >= 1, got {self.dist.expert_parallel}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        model_keys = {f.name for f in fields(ModelConfig)}
        for key in self.model_args:
            if key not in model_keys or key == "moe":
                raise ConfigError(f"unknown model option {key!r}; known: {sorted(model_keys - {'moe'})}")
        for key in self.moe:
            if key not in MOE_KEYS:
                raise ConfigError(f"unknown MoE option {key!r}; known: {list(MOE_KEYS)}")
        try:
            model = self.model_config()
            if model.moe_layer_ids:
                model.moe_config()  # MoeConfig checks its values only when built
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"invalid model config: {e}") from None
        self._check_routing_groups(model, world_size=1)
        ep = self.dist.expert_parallel
        if ep > 1:
            if not model.moe_layer_ids:
                raise ConfigError(f"dist.expert_parallel={ep} needs a model with MoE layers ({self.model} has none)")
            experts = model.moe_config().num_experts
            if experts % ep:
                raise ConfigError(f"dist.expert_parallel={ep} must divide the number of experts ({experts})")
            if model.moe_config().expert_backend == "grouped_mm":
                raise ConfigError(f"dist.expert_parallel={ep} needs moe.expert_backend 'auto' or 'bmm' (the "
                                  f"exchange uses capacity-padded buffers), got 'grouped_mm'")
            if model.moe_config().capacity_tokens != "all":
                raise ConfigError(f"dist.expert_parallel={ep} needs moe.capacity_tokens='all' (every rank of an "
                                  f"expert group must use the same capacity)")
        return self

    def check_world(self, world_size: int) -> None:
        """The checks that need the world size (known once the process group exists)."""
        ep = self.dist.expert_parallel
        if world_size % ep:
            raise ConfigError(f"dist.expert_parallel={ep} needs a world size that is a multiple of it (torchrun "
                              f"--nproc_per_node); the world size is {world_size}")
        self._check_routing_groups(self.model_config(), world_size)

    def _check_routing_groups(self, model, world_size: int) -> None:
        """Each rank's micro-batch must be whole routing groups: groups never span ranks or micro-batches, so
        routing does not change with the number of ranks or with gradient accumulation."""
        parts = world_size * self.optim.accumulation
        where = (f"{world_size} ranks x " if world_size > 1 else "") + f"optim.accumulation={self.optim.accumulation}"
        if self.data.batch_size % parts:
            raise ConfigError(f"data.batch_size={self.data.batch_size} must be divisible by {where}")
        group = model.moe_config().group_size if model.moe_layer_ids else None
        micro = self.data.batch_size // parts
        if group and micro % group:
            raise ConfigError(f"data.batch_size={self.data.batch_size} over {where} gives micro-batches of {micro} "
                              f"pairs, not a multiple of moe.group_size={group} (routing groups never span "
                              f"micro-batches or ranks)")

    def model_config(self):
        """The ModelConfig this run trains; vocabulary and context length come from the tokenizer settings."""
        from limoe.model.registry import get_config

        overrides = {"image_size": self.data.image_size, "vocab_size": self.data.vocab_size,
                     "context_length": self.data.context_length, **self.model_args}
        return get_config(self.model, moe=dict(self.moe), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "")


# -- presets --------------------------------------------------------------------------------------------------
def _default() -> TrainConfig:
    """`limoe train` with no arguments: a tiny LIMoE on the built-in data, minutes on 2 CPU cores."""
    return TrainConfig()


def _quick() -> TrainConfig:
    """Seconds: a smoke test of the whole pipeline on a small subset of the built-in data."""
    return TrainConfig(steps=20, data=DataConfig(batch_size=32, max_concepts=64, num_workers=0),
                       optim=OptimConfig(warmup_steps=5), checkpoint_interval=10, log_interval=5,
                       run_dir="")


def _b16() -> TrainConfig:
    """The paper-size LIMoE-B/16 at 224 px (GPU; bring your own data with data.source=csv|wds)."""
    return TrainConfig(model="limoe-b16", data=DataConfig(image_size=224, batch_size=4096, vocab_size=32_000,
                                                          num_workers=8),
                       optim=OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=10_000, schedule="rsqrt"),
                       steps=100_000, checkpoint_interval=2000, eval=EvalConfig(interval=5000))


PRESETS = {"default": _default, "quick": _quick, "limoe-b16": _b16}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


# -- overrides ------------------------------------------------------------------------------------------------
def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply `key.path=value` strings; values are parsed by the target field's type."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _assign(config, key, raw.strip())
    return config


def _model_field_type(section: str, name: str, key: str) -> Any:
    from limoe.model.config import MOE_KEYS, ModelConfig
    from limoe.moe.layer import MoeConfig

    cls, known = (ModelConfig, None) if section == "model_args" else (MoeConfig, MOE_KEYS)
    hints = typing.get_type_hints(cls)
    allowed = [n for n in hints if n != "moe"] if known is None else list(known)
    if name not in allowed:
        raise ConfigError(f"unknown option {key!r}; {section.replace('_args', '')}.* keys: {allowed}")
    return hints[name]


def _assign(config: TrainConfig, key: str, raw: str) -> None:
    parts = key.split(".")
    if parts[0] in ("model", "moe") and len(parts) == 2:
        section = "model_args" if parts[0] == "model" else "moe"
        getattr(config, section)[parts[1]] = parse_value(raw, _model_field_type(section, parts[1], key), key)
        return
    target: Any = config
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(target, dict):
            if name not in target:
                raise ConfigError(f"unknown option {key!r}; {'.'.join(parts[:i])}.* keys: {sorted(target)}")
            if last:
                target[name] = parse_value(raw, type(target[name]), key)
                return
            target = target[name]
            continue
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown option {key!r}")
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            where = ".".join(parts[:i]) or "top-level"
            raise ConfigError(f"unknown option {key!r}; {where} keys: {sorted(hints)}")
        if last:
            setattr(target, name, parse_value(raw, hints[name], key))
            return
        target = getattr(target, name)
    raise ConfigError(f"unknown option {key!r}")


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_value(raw: str, typ: Any, key: str = "value") -> Any:
    """Parse a command-line string as `typ` (int, float, bool, str, X | None, tuple/list/dict via JSON)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {raw!r}")
    try:
        if typ is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
        if typ is Any:
            return json.loads(raw) if raw[:1] in "[{\"0123456789-" or raw in ("true", "false", "null") else raw
        if origin in (tuple, list) or typ in (tuple, list):
            value = json.loads(raw) if raw.startswith("[") else [v for v in raw.split(",") if v.strip()]
            inner = args[0] if args else Any
            items = [parse_value(str(v), inner, key) if isinstance(v, str) or inner is not Any else v
                     for v in value]
            return tuple(items) if (origin is tuple or typ is tuple) else items
        if origin is dict or typ is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key}: cannot parse {raw!r} as {name}") from None
    raise ConfigError(f"{key}: unsupported option type {typ}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)} in {where or 'top level'}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = _from_dict(typ, value, f"{where}{name}.")
        elif typing.get_origin(typ) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str) -> TrainConfig:
    with open(path, encoding="utf-8") as f:
        return TrainConfig.from_dict(json.load(f))
