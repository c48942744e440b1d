"""Checkpoint conversion: NVIDIA's official EDM2 networks and edm2-multi-gpu checkpoints (C, E and its own G)."""

from .multigpu import from_multigpu, multigpu_to_config
from .official import config_to_official, from_official, official_to_config, to_official
from .official_network import load_official_network
from .official_pipeline import convert_official_pipeline, save_converted_pipeline
from .safe_unpickler import UnsafePickleError, load_official_pickle

__all__ = [
    "from_official",
    "to_official",
    "official_to_config",
    "config_to_official",
    "from_multigpu",
    "multigpu_to_config",
    "load_official_pickle",
    "load_official_network",
    "UnsafePickleError",
    "convert_official_pipeline",
    "save_converted_pipeline",
]
