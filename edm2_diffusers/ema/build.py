"""The `ema:` section of a training config: checked, then built into the tracker the trainer uses."""

from __future__ import annotations

import copy

import torch

from .power import MAX_STD
from .trackers import PowerFunctionEMA, _non_negative_int
from .traditional import WARMUPS, TraditionalEMA, TraditionalEMAWithPostHoc

_KEYS = {
    "power": ("type", "stds", "count_by", "snapshot_every_steps", "snapshot_dtype"),
    "traditional": ("type", "beta", "warmup", "warmup_steps", "snapshot_every_steps", "posthoc"),
}
_POSTHOC_KEYS = ("stds", "count_by", "snapshot_every_steps", "snapshot_dtype")


def check_ema_config(ema_config: dict | None) -> dict:
    """Check the keys and value types of an `ema:` config mapping without building anything; return a copy.

    Raises:
        ValueError: naming the unknown type, the unknown key or the malformed value.
    """
    if ema_config is None:
        return {}
    if not isinstance(ema_config, dict):
        raise ValueError(f"the ema config must be a mapping, got {type(ema_config).__name__}")
    cfg = copy.deepcopy(ema_config)
    kind = cfg.get("type", "power")
    if kind not in _KEYS:
        raise ValueError(f"unknown ema.type {kind!r}; choose one of {sorted(_KEYS)}")
    for key in cfg:
        if key not in _KEYS[kind]:
            raise ValueError(f"unknown key ema.{key} for ema.type {kind!r}; allowed keys: {', '.join(_KEYS[kind])}")
    if "stds" in cfg and not isinstance(cfg["stds"], (list, tuple, int, float)):
        raise ValueError(f"ema.stds must be a list of floats in (0, {MAX_STD:.4f}), got {cfg['stds']!r}")
    if kind == "traditional":
        if cfg.get("warmup", "linear") not in WARMUPS:
            raise ValueError(f"ema.warmup must be one of {', '.join(WARMUPS)}, got {cfg['warmup']!r}")
        posthoc = cfg.get("posthoc")
        if posthoc is not None:
            if not isinstance(posthoc, dict):
                raise ValueError(
                    "ema.posthoc must be a mapping such as {stds: [0.01, 0.05], snapshot_every_steps: 5000}, "
                    f"got {posthoc!r}"
                )
            for key in posthoc:
                if key not in _POSTHOC_KEYS:
                    raise ValueError(f"unknown key ema.posthoc.{key}; allowed keys: {', '.join(_POSTHOC_KEYS)}")
            if "stds" not in posthoc:
                raise ValueError("ema.posthoc needs stds: the relative standard deviations of the tracked profiles")
            if not isinstance(posthoc["stds"], (list, tuple, int, float)):
                raise ValueError(
                    f"ema.posthoc.stds must be a list of floats in (0, {MAX_STD:.4f}), got {posthoc['stds']!r}"
                )
            if cfg.get("snapshot_every_steps"):
                raise ValueError(
                    "set the snapshot spacing of a traditional EMA's post-hoc profiles as "
                    "ema.posthoc.snapshot_every_steps, not ema.snapshot_every_steps"
                )
    return cfg


def build_ema(model: torch.nn.Module, ema_config: dict | None = None):
    """Build the EMA tracker described by the `ema:` mapping of a training config.

    Examples::

        {"type": "power", "stds": [0.05, 0.10], "snapshot_every_steps": 0, "snapshot_dtype": "float32",
         "count_by": "images"}
        {"type": "traditional", "beta": 0.9993, "warmup_steps": 0}
        {"type": "traditional", "beta": 0.9993, "warmup": "ema_pytorch",
         "posthoc": {"stds": [0.012, 0.05], "snapshot_every_steps": 5000, "snapshot_dtype": "float16"}}

    The last one evaluates and exports the traditional EMA and snapshots the power-function profiles beside it.

    Args:
        model (`torch.nn.Module`): the unwrapped model being trained.
        ema_config (`dict`, *optional*): the mapping; `type` defaults to `"power"`, other keys to the tracker's
            defaults. Unknown keys raise `ValueError`.

    Returns:
        `PowerFunctionEMA`, `TraditionalEMA` or `TraditionalEMAWithPostHoc`.
    """
    cfg = check_ema_config(ema_config)
    kind = cfg.pop("type", "power")
    if kind == "power":
        return PowerFunctionEMA(model, **cfg)
    posthoc = cfg.pop("posthoc", None)
    snapshot_every = _non_negative_int("ema.snapshot_every_steps", cfg.pop("snapshot_every_steps", 0))
    if posthoc is not None:
        return TraditionalEMAWithPostHoc(model, **cfg, **posthoc)
    if snapshot_every:
        raise ValueError(
            "ema.snapshot_every_steps needs power-function profiles: a traditional EMA cannot be reconstructed; "
            "add ema.posthoc: {stds: [...], snapshot_every_steps: N} to track them beside it"
        )
    return TraditionalEMA(model, **cfg)


__all__ = ["build_ema", "check_ema_config"]
