"""What `limoe reproduce` trains: the variants of the paper's comparison, the model sizes of the compute sweep and
the scales (smoke / cpu / gpu), expanded into a list of jobs that each is one `limoe train` run.

Every variant is the same base run (same data, steps, batch, optimiser, seed) with a few `--set` overrides, so
a job is exactly reproducible by hand with the command `Job.command()` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from limoe.train.config import TrainConfig, apply_overrides, get_preset

RUNS = "RUNS"  # in a job's overrides: the folder holding the study's run folders (out/runs)
_NO_ENTROPY = ('loss.local_entropy={"image":0,"text":0}', 'loss.global_entropy={"image":0,"text":0}')
_NO_VMOE = ("loss.importance=0", "loss.load=0")
# (g)-(i) swap (f)'s router and keep the rest of its recipe, which the other routers' paper defaults would change
# (limoe.moe.config.ROUTER_PAPER_DEFAULTS, LossConfig): LIMoE's entropy losses, and for Soft MoE the preset's joint
# groups of 8 pairs with top_k's capacity rounding and the slot init they were measured with.
_LIMOE_ENTROPY = ('loss.local_entropy={"image":0.01,"text":0.01}', 'loss.global_entropy={"image":0.01,"text":0.01}')
_SOFT_AS_MEASURED = ("moe.capacity_rounding=ceil", "moe.capacity_multiple_of=4", "moe.soft_init=unit_columns")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # what the table and the plots call it
    model: str  # registry prefix: the size is the scale's ("limoe" + "-tiny" -> limoe-tiny)
    overrides: tuple[str, ...] = ()

    @property
    def is_limoe(self) -> bool:
        return self.model == "limoe"


# The paper's comparison (a, b) and its ablation of the stabilisers (c-f), each LIMoE step adding one to the
# previous: (f) is the full recipe, `limoe train`'s default; (g)-(i) swap its router. Dense and two-tower have
# no router, so aux-loss settings do not matter for them. All LIMoE variants share the model but for the router;
# otherwise only losses and BPR differ.
VARIANTS = (
    Variant("dense", "(a) dense one-tower", "dense"),
    Variant("two-tower", "(b) two-tower (CLIP)", "two-tower"),
    Variant("limoe-plain", "(c) LIMoE, no aux losses, no BPR", "limoe",
            (*_NO_VMOE, *_NO_ENTROPY, "moe.batch_priority=false")),
    Variant("limoe-vmoe", "(d) LIMoE + importance/load (V-MoE)", "limoe", (*_NO_ENTROPY, "moe.batch_priority=false")),
    Variant("limoe-entropy", "(e) (d) + per-modality entropy losses", "limoe", ("moe.batch_priority=false",)),
    Variant("limoe-entropy-bpr", "(f) (e) + BPR: full LIMoE", "limoe"),
    # Other routers on the full recipe: the aux losses they report (z, entropies) keep (f)'s weights; importance,
    # load and BPR do not apply to them. Expert Choice without router noise, as it was measured.
    Variant("limoe-ec", "(g) (f) with Expert Choice (LIMoE's losses, no noise)", "limoe",
            ("moe.router=expert_choice", "moe.noise_std=0", *_LIMOE_ENTROPY)),
    Variant("limoe-soft", "(h) (f) with Soft MoE (LIMoE's joint groups and losses)", "limoe",
            ("moe.router=soft", "moe.group_size=8", "moe.routing_groups=joint", *_SOFT_AS_MEASURED, *_LIMOE_ENTROPY)),
    # Soft MoE mixes every token of a group into every slot: in (h)'s groups of 8 pairs a caption's embedding can
    # draw on its own image (and the group's), a shortcut that held-out evaluation does not offer. Single-example,
    # single-modality groups mix nothing across examples or modalities.
    Variant("limoe-soft-single", "(i) (h) in single-example, per-modality groups", "limoe",
            ("moe.router=soft", "moe.group_size=1", "moe.routing_groups=per_modality", *_SOFT_AS_MEASURED,
             *_LIMOE_ENTROPY)),
    # The same routers as their papers train them (ROUTER_PAPER_DEFAULTS, no aux losses): what `--set
    # moe.router=...` gives. V-MoE's Expert Choice with router noise in (f)'s groups; Soft MoE in one group per
    # example and modality with rounded slots (2 per expert at the cpu scale).
    Variant("limoe-ec-vmoe", "(j) Expert Choice as V-MoE trains it (noise, no aux losses)", "limoe",
            ("moe.router=expert_choice",)),
    Variant("limoe-soft-paper", "(k) Soft MoE as its paper trains it (groups of one example and modality, no aux "
            "losses)", "limoe", ("moe.router=soft",)),
)
# One factor of the full recipe (f) changed at a time (`limoe reproduce --study ablations`), each compared with (f)
# seed by seed: which of its parts matter at a scale. The variants of the paper's comparison leave these alone.
_ENTROPY_X3 = ('loss.local_entropy={"image":0.03,"text":0.03}', 'loss.global_entropy={"image":0.03,"text":0.03}')
ABLATIONS = (
    Variant("f-capacity-2", "(f), training capacity factor 2 (fewer drops)", "limoe", ("moe.capacity_factor=2",)),
    Variant("f-no-noise", "(f) without router noise", "limoe", ("moe.noise_std=0",)),
    Variant("f-independent-experts", "(f), each expert drawn on its own (not V-MoE's one shared draw)", "limoe",
            ("moe.expert_init=independent",)),
    Variant("f-entropy-x3", "(f), entropy-loss weights x3", "limoe", _ENTROPY_X3),
    # The global-entropy threshold at E: the loss is then the paper's plain -H, which binds at every step.
    Variant("f-global-threshold-8", "(f), global-entropy threshold of 8 experts (plain -H)", "limoe",
            ("moe.global_entropy_min_experts=[8,8]",)),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
FULL = "limoe-entropy-bpr"  # (f): the reference of the ablations


@dataclass(frozen=True)
class Size:
    name: str
    overrides: tuple[str, ...] = ()  # model.* overrides on top of the scale's base preset


@dataclass(frozen=True)
class Scale:
    name: str
    description: str
    preset: str  # the TrainConfig preset every job starts from
    model_size: str  # registry suffix: "tiny" -> dense-tiny, limoe-tiny, two-tower-tiny
    base: tuple[str, ...]  # overrides applied to every job
    seeds: tuple[int, ...]
    # The accuracy-vs-compute sweep: dense and the best-recipe LIMoE at more sizes (seed `seeds[0]` only).
    sweep: tuple[Size, ...] = ()
    sweep_variants: tuple[str, ...] = ("dense", "limoe-entropy-bpr")
    parallel: int = 1  # jobs run at once (CPU: one thread each)


SCALES = {
    "smoke": Scale(
        "smoke", "about 2 minutes: every code path on 64 concepts (the CI test)", "quick", "tiny",
        ("steps=4", "data.batch_size=16", "optim.warmup_steps=1", "eval.interval=0", "threads=1"),
        seeds=(0,), sweep=(Size("w48", ("model.width=48", "model.mlp_dim=192")),), parallel=1),
    "cpu": Scale(
        "cpu", "about 100 minutes on 2 CPU cores: `limoe train`'s default run (tiny models: width 64, 4 blocks, "
        "8 experts; 32 px; 2,300 steps of batch 128, 7 passes over the corpus) for every variant and 3 seeds, "
        "two runs at a time on one thread each",
        # (f) is the default run itself, so every variant is compared where the recipe learns (31% seen top-1).
        # At 32 px a pair brings 16 patches and about 8 real text tokens (2:1; the paper's B/16: about 25:1), so
        # text competes for capacity far less than in the paper; 64 px (8:1) learns too slowly for a CPU budget.
        "default", "tiny", ("eval.interval=0", "threads=1"),
        seeds=(0, 1, 2),
        sweep=(Size("w32", ("model.width=32", "model.heads=2", "model.mlp_dim=128")),
               Size("w128", ("model.width=128", "model.mlp_dim=512"))),
        parallel=2),
    "gpu": Scale(
        "gpu", "sized for about 8 minutes on one H200 (estimated, not yet run): 64 px images, width 256, 6 blocks, "
        "8 experts", "default", "tiny",
        # About 5 passes over the corpus, like the CPU scale.
        ("data.image_size=64", "model.width=256", "model.depth=6", "model.heads=8", "model.mlp_dim=1024",
         "moe.num_experts=8", "data.batch_size=256", "optim.lr=5e-4", "steps=300", "eval.interval=0"),
        seeds=(0, 1),
        sweep=(Size("w128", ("model.width=128", "model.heads=4", "model.mlp_dim=512")),
               Size("w384", ("model.width=384", "model.heads=8", "model.mlp_dim=1536"))),
        parallel=1),
}


@dataclass
class Job:
    variant: Variant
    size: str  # "base" or a sweep size name
    seed: int
    overrides: tuple[str, ...]  # every --set, in order; a value RUNS/<name> is the run <name> of the same study
    model: str
    preset: str
    after: str | None = None  # the job whose finished run this one starts from (init_from=RUNS/<that job>)

    @property
    def name(self) -> str:
        return f"{self.variant.name}-{self.size}-s{self.seed}"

    def config(self, run_dir: str) -> TrainConfig:
        cfg = get_preset(self.preset)
        cfg.model = self.model
        runs = os.path.dirname(os.path.abspath(run_dir)) if run_dir else "."
        apply_overrides(cfg, [o.replace(f"={RUNS}/", f"={runs}/", 1) for o in self.overrides])
        cfg.run_dir = run_dir
        return cfg.validate()

    def command(self) -> str:
        sets = " ".join(f"--set '{o}'" if any(c in o for c in '{}" ') else f"--set {o}" for o in self.overrides)
        return f"limoe train --preset {self.preset} --model {self.model} {sets}"


def plan_jobs(scale: Scale, variants: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None,
              overrides: tuple[str, ...] = (), sweep: bool = True) -> list[Job]:
    """The jobs of a scale: every chosen variant x seed at the base size, then the compute sweep.

    `overrides` (`--set` strings) go into every job after the scale's own and before the variant's, so a study
    such as `moe.num_experts=16` changes every LIMoE variant while each keeps its aux-loss / BPR switches.
    """
    chosen = variants or VARIANT_NAMES
    unknown = [v for v in chosen if v not in VARIANT_NAMES]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANT_NAMES)}")
    seeds = seeds or scale.seeds
    base = (*scale.base, *overrides)
    jobs = []
    for variant in VARIANTS:
        if variant.name not in chosen:
            continue
        for seed in seeds:
            jobs.append(Job(variant, "base", seed, (*base, *variant.overrides, f"seed={seed}"),
                            f"{variant.model}-{scale.model_size}", scale.preset))
    for size in scale.sweep if sweep else ():
        for variant in VARIANTS:
            if variant.name in scale.sweep_variants and variant.name in chosen:
                jobs.append(Job(variant, size.name, seeds[0],
                                (*base, *size.overrides, *variant.overrides, f"seed={seeds[0]}"),
                                f"{variant.model}-{scale.model_size}", scale.preset))
    return jobs


def plan_ablations(scale: Scale, seeds: tuple[int, ...] | None = None, overrides: tuple[str, ...] = ()) -> list[Job]:
    """(f) and each ablation of it at the scale's base size, every seed: the same jobs, names and folders as the
    paper study's (f), so a folder holding that study's runs reuses them."""
    seeds = seeds or scale.seeds
    base = (*scale.base, *overrides)
    full = next(v for v in VARIANTS if v.name == FULL)
    return [Job(variant, "base", seed, (*base, *variant.overrides, f"seed={seed}"),
                f"{variant.model}-{scale.model_size}", scale.preset)
            for variant in (full, *ABLATIONS) for seed in seeds]
