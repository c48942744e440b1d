"""The traditional fixed-β EMA (edm2-multi-gpu's evaluated model), optionally with ema-pytorch's warm-up and with
power-function profiles tracked beside it for post-hoc reconstruction."""

from __future__ import annotations

import torch

from .trackers import PowerFunctionEMA, _averaged_copy, _EMATracker, _non_negative_int

# ema-pytorch's warm-up (`ema_pytorch.EMA` defaults): decay 1 − (1 + n / inv_gamma)^(−power), clamped to
# [min_value, β]. edm2-multi-gpu uses it with update_after_step=0, update_every=1.
EMA_PYTORCH_INV_GAMMA = 1.0
EMA_PYTORCH_POWER = 2 / 3
EMA_PYTORCH_MIN_VALUE = 0.0
WARMUPS = ("linear", "ema_pytorch")


def ema_pytorch_decay(update_index: int, beta: float) -> float:
    """The decay `ema_pytorch.EMA(beta, update_after_step=0, update_every=1)` applies at update `update_index`.

    Its first update copies the model (decay 0); update k ≥ 2 uses min(β, 1 − k^(−2/3)) (with its defaults
    inv_gamma 1, power 2/3, min_value 0). It evaluates this in float32 tensors, and so does this function, so that
    the two agree bit for bit.

    Args:
        update_index (`int`): 1-based count of updates, including this one.
        beta (`float`): the final decay β.
    """
    if update_index < 1:
        raise ValueError(f"update_index counts from 1, got {update_index}")
    if update_index == 1:
        return 0.0
    epoch = torch.tensor(float(update_index - 1), dtype=torch.float32)  # steps since the copy
    value = 1 - (1 + epoch / EMA_PYTORCH_INV_GAMMA) ** -EMA_PYTORCH_POWER
    return value.clamp(min=EMA_PYTORCH_MIN_VALUE, max=beta).item()


class TraditionalEMA(_EMATracker):
    """A single EMA with a fixed decay β, optionally warmed up: the classic alternative to power-function EMA.

    Two warm-ups are available:

    * ``warmup="linear"``: during the first `warmup_steps` updates β ramps linearly from 0 (a plain copy) to `beta`,
      β_n = beta · min(1, (n − 1) / warmup_steps) at update n (``warmup_steps=0``: constant β from the first update);
    * ``warmup="ema_pytorch"``: the warm-up of the `ema-pytorch` package, β_n = min(beta, 1 − n^(−2/3)) with a copy at
      n = 1 (see `ema_pytorch_decay`), exactly as `ema_pytorch.EMA(beta, update_after_step=0, update_every=1)`.

    Its half-life is fixed in steps, so unlike the power-function EMA it cannot be changed after training; it writes
    no post-hoc snapshots itself (`TraditionalEMAWithPostHoc` tracks power-function profiles beside it).

    Args:
        model (`torch.nn.Module`): the model being trained, unwrapped.
        beta (`float`, defaults to 0.9993): the decay per optimizer step, in [0, 1).
        warmup_steps (`int`, defaults to 0): length of the linear β warm-up (0 = constant β from the first update).
        warmup (`str`, defaults to `"linear"`): `"linear"` or `"ema_pytorch"`.
    """

    def __init__(self, model: torch.nn.Module, beta: float = 0.9993, warmup_steps: int = 0, warmup: str = "linear"):
        super().__init__(model)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise ValueError(f"ema.beta must be a number in [0, 1), got {beta!r}")
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema.beta must lie in [0, 1), got {beta}")
        if warmup not in WARMUPS:
            raise ValueError(f"ema.warmup must be one of {', '.join(WARMUPS)}, got {warmup!r}")
        self.beta = beta
        self.warmup = warmup
        self.warmup_steps = _non_negative_int("ema.warmup_steps", warmup_steps)
        if warmup == "ema_pytorch" and self.warmup_steps:
            raise ValueError("ema.warmup_steps sets the linear warm-up; the ema_pytorch warm-up has no length to set")
        self.snapshot_every_steps = 0
        self.ema = _averaged_copy(self.model)

    def _copies(self):
        return [self.ema]

    def current_beta(self, update_index: int) -> float:
        """β used by the `update_index`-th update (1-based)."""
        if self.warmup == "ema_pytorch":
            return ema_pytorch_decay(update_index, self.beta)
        if self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, (update_index - 1) / self.warmup_steps)

    def description(self) -> dict:
        """How the average is taken, for an export's card: type, β and warm-up."""
        out = {"type": "traditional", "beta": self.beta, "warmup_steps": self.warmup_steps}
        if self.warmup != "linear":
            out["warmup"] = self.warmup
        return out

    @torch.no_grad()
    def update(self, cur_nimg: int | None = None, batch_size: int | None = None, *, step: int | None = None) -> None:
        """Fold the model's current parameters into the average; call once after each optimizer step.

        The arguments are accepted for interface parity with `PowerFunctionEMA` and not needed: β depends only on the
        number of updates so far.
        """
        self.num_updates += 1
        self._lerp(self.ema, self._follow_device(), self.current_beta(self.num_updates))

    def averaged_models(self) -> list[tuple[str, torch.nn.Module]]:
        """`[("ema", module)]` with buffers refreshed from the model."""
        self._copy_buffers()
        return [("ema", self.ema)]

    def state_dict(self) -> dict:
        return {
            "type": "traditional",
            "beta": self.beta,
            "warmup": self.warmup,
            "warmup_steps": self.warmup_steps,
            "num_updates": int(self.num_updates),
            "emas": [dict(self.ema.state_dict())],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != "traditional":
            raise ValueError(f"EMA checkpoint holds a {state.get('type')!r} EMA, this run tracks a traditional EMA")
        warmup = state.get("warmup", "linear")  # checkpoints written before the option existed
        if warmup != self.warmup:
            raise ValueError(f"EMA checkpoint uses the {warmup!r} warm-up, this run's config asks for {self.warmup!r}")
        self._load_copies(state["emas"])
        self.num_updates = int(state["num_updates"])

    def save_snapshots(self, output_dir: str, step: int, nimg: int, dtype=None) -> list[str]:
        raise ValueError(
            "post-hoc EMA snapshots need the power-function EMA: set `ema: {type: power, ...}` in the config, or "
            "`ema: {type: traditional, ..., posthoc: {stds: [...], snapshot_every_steps: N}}` to track both"
        )


class TraditionalEMAWithPostHoc(TraditionalEMA):
    """A traditional EMA (the evaluated and exported model) with power-function EMA profiles tracked beside it.

    To the trainer it is one traditional EMA: `averaged_models()` returns that single average, which sample grids
    and the final export use. The power-function profiles (`posthoc`, a `PowerFunctionEMA`) are updated at every
    step and written as snapshots every `snapshot_every_steps` (and at the last step), so post-hoc EMA
    reconstruction stays available for the same run (`examples/export_pipeline.py --run_dir RUN --stds ...`).

    Args:
        model (`torch.nn.Module`): the model being trained, unwrapped.
        beta, warmup_steps, warmup: the traditional EMA (see `TraditionalEMA`).
        stds, count_by, snapshot_every_steps, snapshot_dtype: the power-function profiles (see `PowerFunctionEMA`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        beta: float = 0.9993,
        warmup_steps: int = 0,
        warmup: str = "linear",
        *,
        stds=(0.05, 0.10),
        count_by: str = "images",
        snapshot_every_steps: int = 0,
        snapshot_dtype: str = "float32",
    ):
        super().__init__(model, beta=beta, warmup_steps=warmup_steps, warmup=warmup)
        self.posthoc = PowerFunctionEMA(
            model,
            stds=stds,
            count_by=count_by,
            snapshot_every_steps=snapshot_every_steps,
            snapshot_dtype=snapshot_dtype,
        )
        self.snapshot_every_steps = self.posthoc.snapshot_every_steps

    @property
    def stds(self) -> list[float]:
        """Relative standard deviations of the power-function profiles tracked beside the traditional EMA."""
        return self.posthoc.stds

    @torch.no_grad()
    def update(self, cur_nimg: int | None = None, batch_size: int | None = None, *, step: int | None = None) -> None:
        """Update the traditional EMA and every power-function profile (arguments as `PowerFunctionEMA.update`)."""
        self.posthoc.update(cur_nimg, batch_size, step=step)  # validates the clock first: nothing changes on error
        super().update(cur_nimg, batch_size, step=step)

    def posthoc_models(self) -> list[tuple[str, torch.nn.Module]]:
        """`[(label, module), ...]` of the power-function profiles, e.g. `("ema-0.050", net)`."""
        return self.posthoc.averaged_models()

    def description(self) -> dict:
        out = super().description()
        out["posthoc_stds"] = list(self.stds)
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["posthoc"] = self.posthoc.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "posthoc" not in state:
            raise ValueError(
                "EMA checkpoint holds a traditional EMA without post-hoc profiles, this run's config also tracks "
                f"power-function profiles (ema.posthoc stds {self.stds})"
            )
        self.posthoc.load_state_dict(state["posthoc"])  # checked first: a mismatch leaves both averages untouched
        super().load_state_dict(state)

    def save_snapshots(self, output_dir: str, step: int, nimg: int, dtype=None) -> list[str]:
        """Write the power-function profiles' snapshots (see `PowerFunctionEMA.save_snapshots`)."""
        return self.posthoc.save_snapshots(output_dir, step=step, nimg=nimg, dtype=dtype)

    def after_step(self, output_dir: str, step: int, nimg: int, final: bool = False) -> list[str]:
        """The power-function profiles' snapshots (see `PowerFunctionEMA.after_step`)."""
        return self.posthoc.after_step(output_dir, step=step, nimg=nimg, final=final)


__all__ = ["TraditionalEMA", "TraditionalEMAWithPostHoc", "WARMUPS", "ema_pytorch_decay"]
