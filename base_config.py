"""The config schema, re-exported for config files: `from base_config import Config, ...`."""

from integration_training.config import (  # noqa: F401  (re-exports for config files)
    Config,
    DataConfig,
    DatasetSpec,
    EvalConfig,
    LoRAConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    RLConfig,
    SamplingConfig,
    SFTConfig,
    TargetConfig,
)
from integration_training.models import OFFLINE_SMOLLM2  # noqa: F401
from pathlib import Path  # noqa: F401  (configs write Path("./results"))
