"""The training loop: one function, `train(config)`, from an empty run directory (or a checkpoint) to results.

Set-up (the tokenizer, the model and optimizer, a resumed state) makes a `_Run`, the state the steps share; the
loop then runs `train_step` (limoe.train.step) at the scheduled learning rate, logs, evaluates and saves. How the
ranks share the model (DDP, expert parallelism, FSDP) is the strategy's business (limoe.parallel.strategy): the loop
is one path. Every loss term, routing success per modality (from the MoeStats of every MoE layer of the step),
the grad norm and pairs/s go to metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from limoe import checkpoint as ckpt
from limoe.errors import UserError
from limoe.evaluate import NonFiniteEmbeddings
from limoe.locks import folder_lock
from limoe.moe.stats import MoeStats
from limoe.parallel import world as distributed
from limoe.parallel import make_strategy
from limoe.parallel.materialise import build_for
from limoe.train.config import TrainConfig
from limoe.train.data import DataPosition, eval_sets, make_batches, make_tokenizer
from limoe.train.held_out import held_out
from limoe.train.logger import MetricsLogger, require_wandb, results_table, selection_score
from limoe.train.optim import lr_at, make_optimizer, set_lr
from limoe.train.signals import Interrupted, Signals
from limoe.train.step import NonFiniteLoss, train_step


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
    from limoe.parallel.sharded_strategy import local  # a DTensor's own share

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
    tokenizer, tokenizer_skips = _tokenizer(cfg, run_dir, start_path, init_path, world, fork)
    run = _Run(cfg, run_dir, world, device, tokenizer, start_path, init_path)
    if run.logger is not None and tokenizer_skips:
        run.logger.log("data", run.step, {f"tokenizer_skipped/{reason}": n for reason, n in tokenizer_skips.items()})
    if run.rng is not None:
        ckpt.set_rng_state(*run.rng)  # last: nothing between here and the first step may draw random numbers
    try:
        with run.signals:
            return run.train(progress, stop_after)
    finally:
        run.close()


def _tokenizer(cfg: TrainConfig, run_dir: Path, start_path: Path | None, init_path: Path | None, world,
               fork: bool):
    """(the run's tokenizer, captions its training skipped by reason). From the checkpoint when resuming, else
    trained on the training captions (deterministic, but rank 0 trains it and the others load its file, so all
    ranks certainly agree). Rank 0 writes the run's config.json beside it."""
    from limoe.data import Tokenizer

    skips: dict[str, int] = {}
    if start_path is not None:
        if fork and world.main and not (run_dir / "config.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
        return ckpt.read_tokenizer(start_path), skips
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if init_path is not None:  # the token embeddings it starts from belong to the dense run's tokenizer
            ckpt.read_tokenizer(init_path).save(run_dir / "tokenizer.json")
        else:
            trained = make_tokenizer(cfg)
            skips = trained.train_skips  # captions it left out; the run logs them
            trained.save(run_dir / "tokenizer.json")
        (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    distributed.barrier(world)
    return Tokenizer.load(run_dir / "tokenizer.json"), skips


class _LogWindow:
    """The steps since the last train record: their routing counts and time."""

    def __init__(self):
        self.stats: MoeStats | None = None
        self.start, self.steps = time.perf_counter(), 0
        self.routing: dict[str, float] = {}  # the last record's routing summary

    def add(self, stats: MoeStats | None) -> None:
        self.steps += 1
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats + stats

    def close(self, batch_size: int) -> dict[str, float]:
        """pairs/s and routing metrics of the window, which then starts again."""
        self.routing = self.stats.summary() if self.stats else {}
        values = {"pairs_per_s": self.steps * batch_size / (time.perf_counter() - self.start),
                  **{f"routing/{k}": v for k, v in self.routing.items()}}
        self.stats, self.start, self.steps = None, time.perf_counter(), 0
        return values


class _Run:
    """A run's state from set-up to its end: the model, optimizer and data of this rank, the step, and what
    saving, evaluating and stopping share (the last checkpoint, the best score so far, the result)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, world, device: torch.device, tokenizer,
                 start_path: Path | None, init_path: Path | None):
        self.cfg, self.run_dir, self.world, self.device, self.tokenizer = cfg, run_dir, world, device, tokenizer
        model_cfg = cfg.model_config()
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise TrainingError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                f"{model_cfg.vocab_size} (data.vocab_size)")
        self.strategy = make_strategy(cfg, world, device)
        self.model = build_for(self.strategy, model_cfg, device)  # no rank holds more than its share and a block
        if init_path is not None:
            from limoe.upcycle import upcycled_weights

            with torch.no_grad():  # every rank its share, as from a checkpoint
                self.strategy.load_part(self.model, upcycled_weights(ckpt.read_weights(init_path), model_cfg))
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.step, position, self.rng = 0, DataPosition(), None
        if start_path is not None:  # either kind of checkpoint: the strategy takes this rank's share
            state, tensors = ckpt.read_state(start_path)
            self.strategy.load_full_state(self.model, self.optimizer, start_path, tensors, state["optimizer"])
            _check_finite(self.model, self.optimizer, start_path, world, device)
            self.step, position = state["step"], DataPosition(**state["data"]["0"])
            # Rank 0's generators are restored on every rank: all ranks start from the same seed and draw the
            # same shapes, so in a straight run their states are identical too.
            self.rng = (tensors, state["rng"])
        self.model.train()
        self.runner = self.strategy.runner(self.model, cfg.compile)
        self.batches = make_batches(cfg, tokenizer, world.rank, world.size, position)
        self.eval_sets = eval_sets(cfg) if world.main or self.strategy.collective_eval else None
        # Records after the resumed step are replayed: the file keeps them once.
        wandb = (cfg.wandb_project, cfg.to_dict()) if cfg.wandb else None
        self.logger = (MetricsLogger(run_dir, cfg.tensorboard, self.step if start_path else None, cfg.steps, wandb)
                       if world.main else None)
        self.result = RunResult(step=self.step)
        self.last_saved, self.saved_step = start_path, None
        best = ckpt.best_metrics(run_dir) if world.main else None
        self.best_score = selection_score(best) if best else None
        self.signals = Signals()
        self.window = _LogWindow()
        self.data_iter = self.bar = None

    def save(self) -> Path | None:
        """Checkpoint this step (once: the best evaluation's step may be saved again periodically)."""
        if self.saved_step == self.step:
            return self.last_saved
        # Ranks consume batches in lockstep (equal batches per rank), so rank 0's position is every rank's.
        state = {"step": self.step, "data": {"0": asdict(self.batches.position)}, "metrics": {},
                 "world_size": self.world.size, "expert_parallel": self.cfg.dist.expert_parallel,
                 "fsdp": self.cfg.dist.fsdp}
        path = self.strategy.save(self.run_dir, self.step, self.model, self.optimizer, state, self.cfg.to_json(),
                                  self.tokenizer, self.cfg.keep_last)
        if self.world.main:
            self.last_saved = path
        distributed.barrier(self.world)
        self.saved_step = self.step
        return self.last_saved

    def keep_best(self, metrics: dict[str, float] | None) -> None:
        """Save this step and make it checkpoints/best when its held-out score beats every earlier one's
        (collective: saving takes every rank)."""
        score = selection_score(metrics) if metrics else None
        better = score is not None and (self.best_score is None or score > self.best_score)
        if distributed.any_flag(better, self.world, self.device):
            path = self.save()
            if self.world.main:
                self.result.best = ckpt.mark_best(path, metrics)
                self.best_score = score

    def evaluate(self) -> dict[str, float] | None:
        """Held-out metrics on rank 0 ({} on the others); None when a signal interrupted the evaluation. When the
        ranks evaluate together, a signal waits for the end: one rank stopping half-way would stall the others."""
        if not (self.world.main or self.strategy.collective_eval):
            return {}
        stoppable = contextlib.nullcontext() if self.strategy.collective_eval else self.signals.interruptible()
        try:
            with stoppable:
                metrics, chance = held_out(self.model, self.tokenizer, self.eval_sets, self.cfg.eval.batch_size,
                                           self.cfg.eval.loss_batch)
        except Interrupted:
            return None
        except NonFiniteEmbeddings as e:
            raise TrainingError(f"evaluation at step {self.step}: {e}") from None
        if not self.world.main:
            return {}
        self.result.chance.update(chance)
        self.logger.log("eval", self.step, metrics)
        return metrics

    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far by this invocation (rank 0's share), as metrics: none when there are none."""
        self.result.skipped = self.batches.skip_counts()
        return {f"data/skipped/{reason}": n for reason, n in self.result.skipped.items()}

    def stop(self) -> RunResult:
        """Leave before the last step (a signal, or `stop_after`), with a checkpoint."""
        self.result.interrupted = self.signals.name
        self.result.step, self.result.checkpoint = self.step, self.save()
        if self.world.main and self.result.interrupted:
            print(f"\nlimoe: {self.result.interrupted} received: saved {self.result.checkpoint}; resume with "
                  f"--resume latest", flush=True)
        return self.result

    def one_step(self) -> None:
        """The next step at the scheduled learning rate."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.steps)
        set_lr(self.optimizer, lr)
        batch = next(self.data_iter)  # loader workers ignore SIGINT/SIGTERM: a group signal stops only us
        try:
            done = train_step(self.runner, self.model, self.optimizer, self.strategy, batch, cfg, self.device,
                              poison=cfg.debug_nan_at_step == self.step)
        except NonFiniteLoss as e:
            where = (f"; the last good checkpoint is {self.last_saved}" if self.last_saved
                     else "; no checkpoint was written yet")
            raise TrainingError(f"{e} at step {self.step + 1}, stopping{where}") from None
        self.step += 1
        self.result.losses.append(done.sums["total_loss"])
        if self.world.main:  # rank 0 alone logs: the other ranks keep no window
            self._log(done, lr)
        self.bar.update(1)

    def _log(self, done, lr: float) -> None:
        """Add the step to the window; every log_interval steps (and the last) write its record."""
        cfg = self.cfg
        self.window.add(done.stats)
        if self.step % cfg.log_interval and self.step != cfg.steps:
            return
        values = {**done.sums, "lr": lr, **self.window.close(cfg.data.batch_size), **self.skipped()}
        self.logger.log("train", self.step, values)
        post = {"loss": f"{done.sums['total_loss']:.3f}", "pairs/s": f"{values['pairs_per_s']:.0f}"}
        for modality in ("image", "text"):
            if f"routing_success/{modality}" in self.window.routing:
                post[f"ok_{modality[:3]}"] = f"{self.window.routing[f'routing_success/{modality}']:.2f}"
        self.bar.set_postfix(post, refresh=False)

    def train(self, progress: bool, stop_after: int | None) -> RunResult:
        """Steps to cfg.steps (or a stop), then the final checkpoint and evaluation."""
        from tqdm import tqdm

        cfg, world = self.cfg, self.world
        if world.main:  # also without a progress bar: where the run goes is worth knowing before it ends
            pairs = f"{len(self.batches)} training pairs, " if hasattr(self.batches, "__len__") else ""
            ranks = f" x {world.size} ranks" if world.size > 1 else ""
            print(f"limoe: {cfg.model} ({self.model.num_params() / 1e6:.2f}M params), {pairs}batch "
                  f"{cfg.data.batch_size}, {cfg.steps} steps on {self.device}{ranks} -> {self.run_dir}", flush=True)
        self.bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and world.main),
                        dynamic_ncols=True, desc="train", unit="step")
        self.data_iter = iter(self.batches)
        for ran in range(1, cfg.steps - self.step + 1):
            self.one_step()
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.steps:
                self.keep_best(self.evaluate())
                distributed.barrier(world)
            signalled = distributed.any_flag(self.signals.received is not None, world, self.device)
            if signalled or (stop_after is not None and ran >= stop_after):
                return self.stop()
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                self.save()
        # The final checkpoint comes before the final evaluation, so a signal during it loses nothing.
        self.result.step, self.result.checkpoint = self.step, self.save()
        metrics = self.evaluate()
        if metrics is None:
            self.result.interrupted = self.signals.name
            print(f"\nlimoe: {self.result.interrupted} received during the final evaluation: saved "
                  f"{self.result.checkpoint}; evaluate it with limoe eval", flush=True)
            return self.result
        metrics.update({f"train/{k}": v for k, v in self.window.routing.items()})
        self.result.metrics = metrics
        if world.main:
            ckpt.write_metrics(self.result.checkpoint, metrics)
            self.logger.log("final", self.step, {**metrics, **self.skipped()})
        self.keep_best(metrics)
        return self.result

    def close(self) -> None:
        if self.data_iter is not None:
            self.data_iter.close()  # stops the loader's workers now, also when an error is on its way out
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
