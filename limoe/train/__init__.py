"""Training: TrainConfig (presets, overrides), the loop, optimizer and schedule, evaluation during training."""

from limoe.train.config import ConfigError, TrainConfig, apply_overrides, get_preset, load_config
from limoe.train.loop import RunResult, TrainingError, train

__all__ = ["ConfigError", "RunResult", "TrainConfig", "TrainingError", "apply_overrides", "get_preset",
           "load_config", "train"]
