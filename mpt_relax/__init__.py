"""mpt_relax: MPT language models compiled with Apache TVM Relax."""

from .checkpoint import CheckpointError
from .config import ConfigError, MPTConfig, preset

__all__ = ["CheckpointError", "ConfigError", "MPTConfig", "preset"]
