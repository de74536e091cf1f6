"""TrainConfig: nested dataclasses for one training run, named presets, and `--set a.b=value` overrides.

A run is fully described by its TrainConfig, saved as config.json in the run directory (and in every
checkpoint), so `limoe train --resume` and `limoe eval` rebuild exactly the same model and data.

Each field declares its check (type, range or allowed names) next to its default; `validate()` runs them all
before anything is built, so every bad value ends in one ConfigError line naming its dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass
from typing import Any

from limoe.checks import (ConfigError, check_fields, dotted, field_checks, field_keys, flag, integer, mapping, one_of,
                          option, real, section, sequence, text)
from limoe.data.csv_dataset import separator_problem
from limoe.data.sources import SOURCE_NAMES as CORPUS_SOURCES, STYLES as CORPUS_STYLES
from limoe.losses import AUX_MODALITY_WEIGHTS, LossConfig
from limoe.model.config import MOE_CHECKS, ModelConfig
from limoe.model.registry import list_models

SCHEDULES = ("cosine", "rsqrt", "constant")
SIGLIP_BIAS_INIT = -10.0
SOURCES = ("builtin", "corpus", "csv", "wds")
PRECISIONS = ("auto", "bf16", "fp32")


def _device_problem(name: str) -> str | None:
    """What is wrong with `name` as a device on this machine (None: nothing); torch's own error comes late and
    deep (an AssertionError on a CPU-only build)."""
    import torch

    kind, colon, index = name.partition(":")
    if name in ("auto", "cpu") or (name == "mps" and torch.backends.mps.is_available()):
        return None
    if name == "mps":
        return "is 'mps' but MPS is not available here"
    if kind != "cuda" or (colon and not index.isdigit()):
        return f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return f"is {name!r} but torch finds no CUDA device here"
    if colon and int(index) >= count:
        return f"is {name!r} but torch finds only {count} CUDA device(s)"
    return None


# Every field declares its check next to its default (limoe.checks): type, range or allowed names. validate()
# runs them all, then the checks across fields; a field without a check fails every validation.
@dataclass
class DataConfig:
    # corpus (offline emoji + icons in eleven styles, limoe.data.corpus), builtin (offline OpenMoji colour emoji,
    # 3,278 training pairs), csv (CsvPairs file) or wds (webdataset shards)
    source: str = option("corpus", one_of(*SOURCES))
    train: str | None = option(None, text(none=True))  # csv: path of the CSV/TSV; wds: shard pattern
    csv_img_key: str = option("filepath", text())
    csv_caption_key: str = option("title", text())
    # csv: one character, or tab / comma / semicolon / pipe; None: tab for .tsv files, else comma
    csv_separator: str | None = option(None, text(none=True, rule=separator_problem))
    image_size: int = option(32, integer(ge=1))
    batch_size: int = option(128, integer(ge=1))  # global batch (summed over ranks and accumulation micro-steps)
    num_workers: int = option(1, integer(ge=0))
    # BPE tokenizer trained on the training captions; byte-level, so at least 256 bytes + <pad> + <eos>. 8192: most
    # words of the corpus's ~12,000 names are one token, which the tiny text tower needs to tell them apart
    # (the recipe sweep, 900 steps, seed 0: seen-concept top-1 5.54% against 2.82% with 1024; docs/training.md).
    vocab_size: int = option(8192, integer(ge=258))
    context_length: int = option(16, integer(ge=1))
    # builtin / corpus: a small subset of concepts (tests, quick runs)
    max_concepts: int | None = option(None, integer(ge=1, none=True))
    # builtin / corpus: where the rendered dataset lives (default: the limoe cache)
    cache_dir: str | None = option(None, text(none=True))
    # corpus: train on these styles / sources only (None: all); e.g. ["line", "solid"] to hold colour out.
    # Evaluation keeps every style: the held-out concepts of all styles pooled.
    corpus_styles: tuple[str, ...] | None = option(None, sequence(one_of(*CORPUS_STYLES), none=True))
    corpus_sources: tuple[str, ...] | None = option(None, sequence(one_of(*CORPUS_SOURCES), none=True))
    # corpus: training captions drawn from "all" of an image's captions (names, aliases, "name, category",
    # "name: tags") or from its "names" and aliases only
    corpus_captions: str = option("all", one_of("all", "names"))
    # corpus: each caption inside a prompt template of its source ("an icon of {}.", "an emoji of {}."; "source")
    # or alone ("plain")
    corpus_templates: str = option("source", one_of("source", "plain"))
    augment: bool = option(True, flag())  # random resized crop (+ colour jitter if jitter > 0) on training images
    # open_clip's default crop (area 0.9-1.0), no jitter: without augmentation the default run's seen-concept top-1
    # is level and its held-out-concept top-1 a point lower (docs/training.md); the stronger crop (from 0.6) and
    # jitter 0.2 that held off overfitting on the 3,278 built-in pairs cost the corpus: a crop that cuts off half an
    # icon changes what it shows.
    crop_scale: float = option(0.9, real(gt=0, le=1))  # smallest area fraction of the random crop
    # brightness / contrast / saturation factors in [1 - jitter, 1 + jitter]: below 1 keeps them positive
    jitter: float = option(0.0, real(ge=0, lt=1))
    # Built-in data and corpus: decode the images once and keep them in memory (decoding costs more than a tiny
    # model's step on CPU; the corpus's training split at twice a 32 px image_size is ~510 MB of uint8, decoded in
    # ~15 s); csv/wds sources always stream.
    in_memory: bool = option(True, flag())


@dataclass
class OptimConfig:
    lr: float = option(1e-3, real(gt=0))
    weight_decay: float = option(0.5, real(ge=0))  # measured on the default run: 0.5 held out slightly better than 0.1
    beta1: float = option(0.9, real(ge=0, lt=1))
    beta2: float = option(0.98, real(ge=0, lt=1))  # CLIP's: contrastive training is noisy and 0.999 reacts too slowly
    eps: float = option(1e-6, real(gt=0))
    warmup_steps: int = option(100, integer(ge=0))
    schedule: str = option("cosine", one_of(*SCHEDULES))  # after the linear warmup
    min_lr_ratio: float = option(0.0, real(ge=0, le=1))  # cosine floor as a fraction of lr
    # rsqrt: lr * sqrt(timescale / step) after warmup; None: warmup_steps
    rsqrt_timescale: int | None = option(None, integer(ge=1, none=True))
    grad_clip: float | None = option(1.0, real(gt=0, none=True))  # max global grad norm; None: no clipping
    # micro-batches per optimizer step (the batch is split, not multiplied)
    accumulation: int = option(1, integer(ge=1))


@dataclass
class EvalConfig:
    interval: int = option(300, integer(ge=0))  # steps between evaluations; 0: only at the end
    zero_shot: bool = option(True, flag())  # built-in held-out concepts (or eval.zero_shot_dir)
    seen: bool = option(True, flag())  # the corpus's seen concepts in unseen renderings
    retrieval: bool = option(True, flag())  # built-in test pairs (or eval.retrieval_csv), and their loss
    # An image folder or webdataset shards (CLIP_benchmark's layout): limoe.data.zero_shot
    zero_shot_dir: str | None = option(None, text(none=True))
    # Its class names and templates: a file, or a built-in name (cifar10|cifar100; simple|openai|openai-cifar);
    # None: the files beside the data, else folder names and the default templates
    class_names: str | None = option(None, text(none=True))
    templates: str | None = option(None, text(none=True))
    retrieval_csv: str | None = option(None, text(none=True))
    batch_size: int = option(256, integer(ge=1))
    # Pairs per fixed batch of the held-out contrastive loss (retrieval/contrastive_loss): the same for every
    # run, whatever its training batch, so that the loss compares runs.
    loss_batch: int = option(128, integer(ge=2))


@dataclass
class DistConfig:
    # Expert-parallel size P under torchrun: each MoE layer's experts are split over groups of P ranks (the
    # world size must be a multiple of P, num_experts divisible by P); the rest of the model is data-parallel.
    expert_parallel: int = option(1, integer(ge=1))
    # FSDP2 under torchrun: parameters, gradients and AdamW states sharded over the ranks (experts over the ranks
    # holding the same experts) instead of replicated; for models that do not fit one device. False: DDP.
    fsdp: bool = option(False, flag())


@dataclass
class TrainConfig:
    model: str = option("limoe-tiny", one_of(*list_models()))
    # ModelConfig overrides (--set model.width=96), each checked as ModelConfig declares it; "model.*" to users
    model_args: dict[str, Any] = option(check=mapping(keys=field_checks(ModelConfig, exclude=("moe",))),
                                        factory=dict, key="model")
    # MoeConfig overrides (--set moe.capacity_factor=1.25), each checked as MoeConfig declares it
    moe: dict[str, Any] = option(check=mapping(keys=MOE_CHECKS), factory=dict)
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    loss: LossConfig = section(LossConfig)
    eval: EvalConfig = section(EvalConfig)
    dist: DistConfig = section(DistConfig)
    steps: int = option(900, integer(ge=1))  # the default preset trains 2,300 (7.1 passes over the corpus)
    seed: int = option(0, integer(ge=0, lt=2**63))  # torch.manual_seed takes at most 64 bits
    run_dir: str = option("", text())  # "": runs/<model>-<date>-<time>, a new folder per run
    # Sparse upcycling: a new run's weights from this dense one-tower run or checkpoint, each expert a copy of its
    # block's MLP, routers fresh; its tokenizer too (limoe.upcycle). A resumed run ignores it.
    init_from: str | None = option(None, text(none=True))
    device: str = option("auto", text(rule=_device_problem))  # auto: cuda if available, else cpu
    # CPU intra-op threads: the default run trains 1.26x as fast on two as on one (alone on 2 cores: 1,170
    # against 930 pairs/s). More threads than free cores slow OpenMP down several times: runs side by side want one
    # each (limoe reproduce sets it); None: torch's default (all cores).
    threads: int | None = option(2, integer(ge=1, none=True))
    log_interval: int = option(10, integer(ge=1))  # steps between metrics lines in metrics.jsonl
    # steps between checkpoints (one is always written at the end; 0: only that one)
    checkpoint_interval: int = option(300, integer(ge=0))
    keep_last: int = option(3, integer(ge=1))  # checkpoints kept; older ones are deleted
    compile: bool = option(False, flag())  # torch.compile the model
    # Recompute each block's activations in the backward instead of keeping them: less memory, ~1/3 more compute.
    activation_checkpointing: bool = option(False, flag())
    # Training's compute precision: "auto" = bf16 autocast on CUDA, fp32 on CPU; "bf16" = bf16 autocast on any
    # device; "fp32" = none. Weights, AdamW states and router logits stay float32 in every mode.
    precision: str = option("auto", one_of(*PRECISIONS))
    tensorboard: bool = option(False, flag())  # also log to TensorBoard (only if it is installed)
    # also log to Weights & Biases (the [wandb] extra), in this project; WANDB_MODE=offline needs no account
    wandb: bool = option(False, flag())
    wandb_project: str = option("limoe", text())
    # testing aid: make the loss NaN at this step
    debug_nan_at_step: int | None = option(None, integer(ge=0, none=True))

    def validate(self) -> "TrainConfig":
        """Every field's declared check (one line naming the dotted key), then the checks across fields."""
        check_fields(self)
        if self.data.source not in ("builtin", "corpus") and not self.data.train:
            raise ConfigError(f"data.source={self.data.source} needs data.train (a CSV path or a shard pattern)")
        try:
            model = self.model_config()
            if model.moe_layer_ids:
                model.moe_config()  # MoeConfig checks k <= num_experts and the like only when built
        except (KeyError, ValueError, TypeError) as e:  # a check across fields names them bare: name their keys
            raise ConfigError(f"invalid model config: {dotted(str(e), self._user_keys())}") from None
        self._check_routing_groups(model, world_size=1)
        if model.moe_layer_ids:
            modalities = model.moe_config().modalities
            for kind in AUX_MODALITY_WEIGHTS:  # a typo ("txt") would leave that modality's loss unweighted
                unknown = sorted(set(getattr(self.loss, kind)) - set(modalities))
                if unknown:
                    raise ConfigError(f"loss.{kind} weighs modalities {unknown} that moe.modalities "
                                      f"{tuple(modalities)} does not have")
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

    def _user_keys(self) -> dict[str, str]:
        """Each model and MoE field -> the key users set it by: model.<field>, moe.<field>, and data.<field> for
        what the data settings give the model unless model.* overrides it (image size, vocabulary, context)."""
        keys = {**field_keys(ModelConfig, "model.", exclude=("moe",)), **{k: f"moe.{k}" for k in MOE_CHECKS}}
        for name in ("image_size", "vocab_size", "context_length"):
            if name not in self.model_args:
                keys[name] = f"data.{name}"
        return keys

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
        if self.loss.contrastive == "sigmoid":
            # SigLIP as its authors train it: logit scale exp(log 10) (every preset's init) and bias -10, so the
            # B^2 - B negatives start near their target instead of dominating the first steps. model.* overrides it.
            overrides.setdefault("logit_bias_init", SIGLIP_BIAS_INIT)
        return get_config(self.model, moe=dict(self.moe), **overrides)

    def resolved(self) -> "TrainConfig":
        """This config with every default that depends on other keys written out (the loss weights the model's
        router implies): two configs that train the same run resolve to the same."""
        model = self.model_config()
        router = model.moe_config().router if model.moe_layer_ids else "top_k"
        return dataclasses.replace(self, loss=self.loss.resolved(router))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "")


# -- presets --------------------------------------------------------------------------------------------------
def _default() -> TrainConfig:
    """`limoe train` with no arguments: a tiny LIMoE on the corpus, under 5 minutes on 2 CPU cores. Steps and
    learning rate come from the sweep in docs/training.md; evaluated halfway and at the end."""
    return TrainConfig(steps=2300, data=DataConfig(corpus_templates="plain"),
                       optim=OptimConfig(lr=2e-3, warmup_steps=200), eval=EvalConfig(interval=1150))


def _quick() -> TrainConfig:
    """Seconds: a smoke test of the whole pipeline on a small subset of the corpus."""
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
    value_type: Any = None  # the values' type of a dict field with free keys (dict[str, float]), else None
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(target, dict):
            if name not in target and not (last and value_type):
                raise ConfigError(f"unknown option {key!r}; {'.'.join(parts[:i])}.* keys: {sorted(target)}")
            if last:
                target[name] = parse_value(raw, value_type or type(target[name]), key)
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
        args = typing.get_args(hints[name])
        value_type = args[1] if typing.get_origin(hints[name]) is dict and args[:1] == (str,) else None
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
        for choice in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, choice, key)
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


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build `cls` from JSON data, refusing unknown keys and values of the wrong type (one line naming the key).
    Values are left to validate(): a run's saved config must load for evaluation on another machine (its device),
    and `limoe train --config` may still change them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a dict of {cls.__name__} options, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)} in {where or 'top level'}")
    kwargs = {}
    for name, value in data.items():
        check, key = known[name].metadata["check"], where + known[name].metadata.get("key", name)
        section_cls = check.kinds[0]
        if dataclasses.is_dataclass(section_cls):
            value = _from_dict(section_cls, value, f"{key}.")
        else:
            check(key, value, values=False)
            if tuple in check.kinds and isinstance(value, list):
                value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section that checks itself when built (LossConfig) names its keys without `where`
        raise ConfigError(f"{where}{e}") from None


def load_config(path: str) -> TrainConfig:
    with open(path, encoding="utf-8") as f:
        return TrainConfig.from_dict(json.load(f))
