"""Checkpoint conversion: NVIDIA's official EDM2 networks and edm2-multi-gpu checkpoints."""

from .multigpu import from_multigpu, multigpu_to_config
from .official import config_to_official, from_official, official_to_config, to_official

__all__ = [
    "from_official",
    "to_official",
    "official_to_config",
    "config_to_official",
    "from_multigpu",
    "multigpu_to_config",
]
