"""Shared helpers for the training tests: a seconds-long config on a small subset of the built-in data."""

from limoe.train.config import DataConfig, EvalConfig, OptimConfig, TrainConfig


def tiny_config(tmp_path, cache_dir=None, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        model="limoe-tiny",
        data=DataConfig(source="builtin", batch_size=16, max_concepts=40, num_workers=0, vocab_size=512,
                        cache_dir=str(cache_dir or tmp_path / "cache")),
        optim=OptimConfig(warmup_steps=2, lr=2e-3),
        eval=EvalConfig(batch_size=64),
        steps=6, log_interval=2, checkpoint_interval=3, keep_last=2, run_dir=str(tmp_path / "run"),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
