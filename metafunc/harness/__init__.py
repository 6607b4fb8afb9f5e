"""The experiment harness: configs, runs, checkpoints (what the ``metafunc`` command uses)."""

from metafunc.harness.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from metafunc.harness.config import PRESETS, Config, ConfigError, load_config_file
from metafunc.harness.run import NumericsError, build, evaluate, train

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "NumericsError",
    "build",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config_file",
    "save_checkpoint",
    "train",
]
