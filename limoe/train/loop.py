"""The training loop: one function, `train(config)`, from an empty run directory (or a checkpoint) to results.

Order of a step: micro-batches (gradient accumulation) -> forward under autocast (`precision`: bf16 on CUDA, fp32
on CPU by default) -> compute_losses -> backward -> clip -> AdamW with the scheduled lr. How the ranks share the
model (DDP, expert parallelism, FSDP) is the strategy's business (limoe.train.strategy): the loop is one path.
Every loss term, routing success per modality (from the MoeStats of every MoE layer of the step), the grad norm
and pairs/s go to metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from limoe import checkpoint as ckpt
from limoe.errors import UserError
from limoe.evaluate import NonFiniteEmbeddings
from limoe.locks import folder_lock
from limoe.losses import compute_losses
from limoe.moe.stats import MoeStats
from limoe.train import distributed
from limoe.train.config import TrainConfig
from limoe.train.data import DataPosition, eval_sets, make_batches, make_tokenizer
from limoe.train.evaluation import held_out
from limoe.train.logger import MetricsLogger, require_wandb, results_table, selection_score
from limoe.train.materialise import build_for
from limoe.train.optim import lr_at, make_optimizer, set_lr
from limoe.train.signals import Interrupted, Signals
from limoe.train.strategy import make_strategy


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message is one line for the command line."""


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    interrupted: str | None = None  # the signal's name when a signal stopped the run
    losses: list[float] = field(default_factory=list)  # total loss of every step of this invocation
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped by this invocation, by reason
    best: Path | None = None  # checkpoints/best when this invocation made a new best, else None

    def table(self) -> str:
        return results_table(self.metrics, self.chance)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The forward pass's autocast for `precision` (TrainConfig.precision) on `device`."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_losses(model: nn.Module, batch, cfg: TrainConfig, device: torch.device
                ) -> tuple[dict[str, torch.Tensor], MoeStats | None]:
    """Forward one (micro-)batch: loss terms and the routing counts summed over every MoE layer and pass."""
    batch = batch.to(device, non_blocking=True)
    with autocast(device, cfg.precision):
        out = model(batch.images_B3HW, batch.ids_BL, valid_BT=~batch.padding_mask_BL)
        terms = compute_losses(out, cfg.loss)
    stats = None
    for record in out.aux:
        stats = record.stats if stats is None else stats + record.stats
    return terms, stats


def _split(batch, parts: int) -> list:
    n = len(batch) // parts
    return [batch.rows(i * n, (i + 1) * n) for i in range(parts)] if parts > 1 else [batch]


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None, progress: bool = True,
          fork: bool = False) -> RunResult:
    """Train (or resume) the run described by `cfg`; returns the final metrics.

    `resume`: "latest" (of cfg.run_dir) or a checkpoint path. `fork`: allow resuming a checkpoint of another run
    directory or of a different model config (refused otherwise: almost always a mistake). `stop_after`: leave
    after this many steps of this invocation, with a checkpoint (as if interrupted; used to test exact resume).
    """
    cfg.validate()
    if cfg.wandb:  # before anything trains: a missing logger is a one-line error, not one after the tokenizer
        require_wandb()
    device = pick_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Adam's second moments and some gradients underflow into denormal floats, which x86 CPUs process
        # ~100x slower: without this a tiny model's step goes from ~60 ms to seconds.
        torch.set_flush_denormal(True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
    world = distributed.init(device.type)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    try:
        cfg.check_world(world.size)  # before anything is written
        _check_fits(cfg, world.size, device)
        run_dir = _run_dir(cfg, resume, world)
        start_path = ckpt.resolve(resume, run_dir) if resume else None
        if start_path is not None and not fork:  # refused before the folder is made (and locked)
            _check_resumable(start_path, run_dir, cfg)
        init_path = _upcycle_source(cfg) if start_path is None and cfg.init_from else None
        # Rank 0 writes the run's files: it alone holds the folder, against a second run started on it.
        with folder_lock(run_dir, "limoe train") if world.main else contextlib.nullcontext():
            return _train(cfg, run_dir, start_path, stop_after, progress, device, world, fork, init_path)
    except OSError as e:  # a read-only or full disk, a file where a folder should be: one line, not a traceback
        raise TrainingError(f"{e.filename or cfg.run_dir}: {e.strerror or e}") from None
    finally:
        distributed.shutdown(world)
        torch.set_num_threads(threads)


def _upcycle_source(cfg: TrainConfig) -> Path:
    """The dense checkpoint `cfg.init_from` names, checked to fit the run's model before anything is written."""
    from limoe.upcycle import check_upcyclable

    path = ckpt.resolve(cfg.init_from)
    check_upcyclable(ckpt.read_model_config(path), cfg.model_config(), str(path))
    return path


def _check_fits(cfg: TrainConfig, ranks: int, device: torch.device) -> None:
    """An impossible size is refused before the tokenizer trains or the model is built (either could take the
    machine down first)."""
    from limoe.train.sizing import Layout, check_fits

    micro_batch = cfg.data.batch_size // (ranks * cfg.optim.accumulation)
    layout = Layout(ranks, cfg.dist.expert_parallel, cfg.dist.fsdp)
    try:
        check_fits(cfg.model_config(), layout, micro_batch, device, cfg.activation_checkpointing)
    except ValueError as e:
        raise TrainingError(f"{cfg.model}: {e}") from None


def _check_finite(model: nn.Module, optimizer, start: Path, world, device: torch.device) -> None:
    """A resumed state with a NaN or an infinity (a damaged shard) would train until the loss is NaN, then name
    this checkpoint the last good one: refused on every rank (each checks its own share)."""
    from limoe.train.sharded import local  # a DTensor's own share

    tensors = {**{f"model.{k}": local(v) for k, v in model.state_dict().items()},
               **{f"optimizer.{i}.{slot}": local(v) for i, per_param in enumerate(optimizer.state.values())
                  for slot, v in per_param.items()}}
    broken = ckpt.non_finite(tensors)
    if distributed.any_flag(bool(broken), world, device):
        which = f" (first: {broken[0]})" if broken else " (on another rank)"
        raise TrainingError(f"{start}: non-finite values in the saved weights or optimizer state{which}; the "
                            f"checkpoint is damaged: resume from an earlier one with --resume PATH")


def _run_dir(cfg: TrainConfig, resume: str | None, world) -> Path:
    """The run's folder: a new dated one unless given."""
    if not cfg.run_dir:
        if resume == "latest":
            raise TrainingError("--resume latest needs --run-dir (the run to resume)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if world.size > 1:  # every rank must agree on the name
            import torch.distributed as dist

            box = [stamp]
            dist.broadcast_object_list(box, src=0)
            stamp = box[0]
        cfg.run_dir = str(Path("runs") / f"{cfg.model}-{stamp}")
    return Path(cfg.run_dir)


def _check_resumable(start: Path, run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming continues the same run: another run's checkpoint, or another model, is refused."""
    owner = ckpt.run_dir_of(start)
    if owner != run_dir.resolve():
        raise TrainingError(f"{start} belongs to the run {owner}, not {run_dir}: pass --fork to continue it in "
                            f"another run directory")
    as_json = lambda config: json.loads(json.dumps(asdict(config)))  # tuples and lists compare equal
    saved, wanted = as_json(ckpt.read_model_config(start)), as_json(cfg.model_config())
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)} -> {wanted.get(k)}" for k in changed[:3])
        raise TrainingError(f"{start} was trained as another model ({detail}): pass --fork to start from it anyway")


def _train(cfg, run_dir: Path, start_path: Path | None, stop_after, progress, device, world,
           fork=False, init_path: Path | None = None) -> RunResult:
    if start_path is None and ckpt.list_checkpoints(run_dir):  # a fresh run never writes into an earlier run's
        raise TrainingError(f"{run_dir} already has checkpoints: pass --resume latest to continue it, or "
                            f"another --run-dir")
    torch.manual_seed(cfg.seed)

    tokenizer_skips: dict[str, int] = {}
    # Tokenizer: from the checkpoint when resuming, else trained on the training captions (deterministic,
    # but rank 0 trains it and the others load its file so all ranks certainly agree).
    from limoe.data import Tokenizer

    if start_path is not None:
        tokenizer = ckpt.read_tokenizer(start_path)
        if fork and world.main and not (run_dir / "config.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    else:
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if init_path is not None:  # the token embeddings it starts from belong to the dense run's tokenizer
                ckpt.read_tokenizer(init_path).save(run_dir / "tokenizer.json")
            else:
                trained = make_tokenizer(cfg)
                tokenizer_skips = trained.train_skips  # captions it left out; the run logs them below
                trained.save(run_dir / "tokenizer.json")
            (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
        distributed.barrier(world)
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")

    model_cfg = cfg.model_config()
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{model_cfg.vocab_size} (data.vocab_size)")
    strategy = make_strategy(cfg, world, device)
    model = build_for(strategy, model_cfg, device)  # no rank ever holds more than its share and one block
    if init_path is not None:
        from limoe.upcycle import upcycled_weights

        with torch.no_grad():  # every rank its share, as from a checkpoint
            strategy.load_part(model, upcycled_weights(ckpt.read_weights(init_path), model_cfg))
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    optimizer = make_optimizer(model, cfg.optim)
    step, position, rng = 0, DataPosition(), None
    if start_path is not None:  # either kind of checkpoint: the strategy takes this rank's share
        state, tensors = ckpt.read_state(start_path)
        strategy.load_full_state(model, optimizer, start_path, tensors, state["optimizer"])
        _check_finite(model, optimizer, start_path, world, device)
        step, position = state["step"], DataPosition(**state["data"]["0"])
        # Rank 0's generators are restored on every rank: all ranks start from the same seed and draw the
        # same shapes, so in a straight run their states are identical too.
        rng = (tensors, state["rng"])
    model.train()
    runner = strategy.runner(model, cfg.compile)

    batches = make_batches(cfg, tokenizer, world.rank, world.size, position)
    evaluation_sets = eval_sets(cfg) if world.main or strategy.collective_eval else None
    # Records after the resumed step are replayed: the file keeps them once.
    resumed_at = step if start_path else None
    wandb = (cfg.wandb_project, cfg.to_dict()) if cfg.wandb else None
    logger = MetricsLogger(run_dir, cfg.tensorboard, resumed_at, cfg.steps, wandb) if world.main else None
    if logger is not None and tokenizer_skips:
        logger.log("data", step, {f"tokenizer_skipped/{reason}": n for reason, n in tokenizer_skips.items()})
    if rng is not None:
        ckpt.set_rng_state(*rng)  # last: nothing between here and the first step may draw random numbers

    result = RunResult(step=step)
    last_saved, saved_step = start_path, None
    best = ckpt.best_metrics(run_dir) if world.main else None
    best_score = selection_score(best) if best else None

    def save() -> Path | None:
        nonlocal last_saved, saved_step
        if saved_step == step:  # e.g. the best evaluation's step, then the periodic save of the same step
            return last_saved
        # Ranks consume batches in lockstep (equal batches per rank), so rank 0's position is every rank's.
        state = {"step": step, "data": {"0": asdict(batches.position)}, "metrics": {},
                 "world_size": world.size, "expert_parallel": cfg.dist.expert_parallel, "fsdp": cfg.dist.fsdp}
        path = strategy.save(run_dir, step, model, optimizer, state, cfg.to_json(), tokenizer, cfg.keep_last)
        if world.main:
            last_saved = path
        distributed.barrier(world)
        saved_step = step
        return last_saved

    def keep_best(metrics: dict[str, float] | None) -> None:
        """Save this step and make it checkpoints/best when its held-out score beats every earlier one's
        (collective: saving takes every rank)."""
        nonlocal best_score
        score = selection_score(metrics) if metrics else None
        if distributed.any_flag(score is not None and (best_score is None or score > best_score), world, device):
            path = save()
            if world.main:
                result.best = ckpt.mark_best(path, metrics)
                best_score = score

    signals = Signals()

    def evaluate_now() -> dict[str, float] | None:
        """Held-out metrics on rank 0 ({} on the others); None when a signal interrupted the evaluation. When the
        ranks evaluate together, a signal waits for the end: one rank stopping half-way would stall the others."""
        if not (world.main or strategy.collective_eval):
            return {}
        stoppable = contextlib.nullcontext() if strategy.collective_eval else signals.interruptible()
        try:
            with stoppable:
                metrics, chance = held_out(model, tokenizer, evaluation_sets, cfg.eval.batch_size, cfg.eval.loss_batch)
        except Interrupted:
            return None
        except NonFiniteEmbeddings as e:
            raise TrainingError(f"evaluation at step {step}: {e}") from None
        if not world.main:
            return {}
        result.chance.update(chance)
        logger.log("eval", step, metrics)
        return metrics

    from tqdm import tqdm

    if world.main:  # also without a progress bar: where the run goes is worth knowing before it ends
        pairs = f"{len(batches)} training pairs, " if hasattr(batches, "__len__") else ""
        print(f"limoe: {cfg.model} ({model.num_params() / 1e6:.2f}M params), {pairs}batch {cfg.data.batch_size}, "
              f"{cfg.steps} steps on {device}{f' x {world.size} ranks' if world.size > 1 else ''} -> {run_dir}",
              flush=True)
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and world.main), dynamic_ncols=True,
               desc="train", unit="step")
    window_stats: MoeStats | None = None
    window_start, window_steps = time.perf_counter(), 0
    last_routing: dict[str, float] = {}
    data_iter = iter(batches)
    ran = 0
    accumulation = cfg.optim.accumulation

    def skipped() -> dict[str, int]:
        """Bad samples skipped so far by this invocation (rank 0's share), as metrics: none when there are none."""
        result.skipped = batches.skip_counts()
        return {f"data/skipped/{reason}": n for reason, n in result.skipped.items()}

    def stop() -> RunResult:
        result.interrupted = signals.name
        result.step, result.checkpoint = step, save()
        if world.main and result.interrupted:
            print(f"\nlimoe: {result.interrupted} received: saved {result.checkpoint}; resume with "
                  f"--resume latest", flush=True)
        return result

    try:
        with signals:
            while step < cfg.steps:
                lr = lr_at(step, cfg.optim, cfg.steps)
                set_lr(optimizer, lr)
                batch = next(data_iter)  # loader workers ignore SIGINT/SIGTERM: a group signal stops only us
                optimizer.zero_grad(set_to_none=True)
                sums_T: dict[str, torch.Tensor] = {}  # detached, on the device: no host sync per term
                for i, micro in enumerate(_split(batch, accumulation)):
                    with strategy.accumulating(runner, last=i == accumulation - 1):
                        terms, stats = step_losses(runner, micro, cfg, device)
                        if cfg.debug_nan_at_step is not None and step == cfg.debug_nan_at_step:
                            terms["total_loss"] = terms["total_loss"] * float("nan")
                        (terms["total_loss"] / accumulation).backward()
                    for name, value in terms.items():
                        part = value.detach().float() / accumulation
                        sums_T[name] = sums_T[name] + part if name in sums_T else part
                    if stats is not None:
                        window_stats = stats if window_stats is None else window_stats + stats
                strategy.reduce_gradients(model)
                if cfg.optim.grad_clip:
                    sums_T["grad_norm"] = strategy.clip_grad_norm(model, cfg.optim.grad_clip)
                # One host transfer per step for every logged term and the grad norm; nothing steps before it.
                sums = dict(zip(sums_T, torch.stack([v.float() for v in sums_T.values()]).tolist()))
                if not math.isfinite(sums["total_loss"]):
                    where = (f"; the last good checkpoint is {last_saved}" if last_saved
                             else "; no checkpoint was written yet")
                    raise TrainingError(f"non-finite loss ({sums['total_loss']}) at step {step + 1}, "
                                        f"stopping{where}")
                optimizer.step()
                model.clamp_logit_scale()  # after the step, as open_clip: a clamp in forward would zero its gradient
                step += 1
                ran += 1
                window_steps += 1
                result.losses.append(sums["total_loss"])
                if world.main and (step % cfg.log_interval == 0 or step == cfg.steps):
                    seconds = time.perf_counter() - window_start
                    routing = window_stats.summary() if window_stats else {}
                    last_routing = routing
                    values = {**sums, "lr": lr, "pairs_per_s": window_steps * cfg.data.batch_size / seconds,
                              **{f"routing/{k}": v for k, v in routing.items()}, **skipped()}
                    logger.log("train", step, values)
                    post = {"loss": f"{sums['total_loss']:.3f}", "pairs/s": f"{values['pairs_per_s']:.0f}"}
                    for modality in ("image", "text"):
                        if f"routing_success/{modality}" in routing:
                            post[f"ok_{modality[:3]}"] = f"{routing[f'routing_success/{modality}']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    window_stats, window_start, window_steps = None, time.perf_counter(), 0
                bar.update(1)
                if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.steps:
                    keep_best(evaluate_now())
                    distributed.barrier(world)
                signalled = distributed.any_flag(signals.received is not None, world, device)
                if signalled or (stop_after is not None and ran >= stop_after):
                    return stop()
                if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.steps:
                    save()
            # The final checkpoint comes before the final evaluation, so a signal during it loses nothing.
            result.step, result.checkpoint = step, save()
            metrics = evaluate_now()
            if metrics is None:
                result.interrupted = signals.name
                print(f"\nlimoe: {result.interrupted} received during the final evaluation: saved "
                      f"{result.checkpoint}; evaluate it with limoe eval", flush=True)
                return result
        metrics.update({f"train/{k}": v for k, v in last_routing.items()})
        result.metrics = metrics
        if world.main:
            ckpt.write_metrics(result.checkpoint, metrics)
            logger.log("final", step, {**metrics, **skipped()})
        keep_best(metrics)
        return result
    finally:
        data_iter.close()  # stops the loader's workers now, also when an error is on its way out
        bar.close()
        if logger is not None:
            logger.close()
