"""EMA trackers used during training: power-function EMA (paper Section 3.1), a traditional fixed-β EMA, and a
traditional EMA with power-function profiles tracked beside it (`TraditionalEMAWithPostHoc`).

The trainer calls, in this order::

    ema = build_ema(unwrapped_model, cfg["ema"])
    accelerator.register_for_checkpointing(ema)           # state_dict()/load_state_dict(): resume is exact
    ...after every optimizer step...
    ema.update(cur_nimg=images_seen_including_this_batch, batch_size=global_batch_size)
    if ema.snapshot_every_steps and step % ema.snapshot_every_steps == 0 and accelerator.is_main_process:
        ema.save_snapshots(output_dir, step=step, nimg=images_seen)
    for label, net in ema.averaged_models(): ...           # sampling / evaluation

The averaged copies are float32 modules on the tracked model's device, kept outside the model (never registered as
its submodules). Parameters are averaged; buffers (e.g. Fourier frequencies) are copied from the model.
"""

from __future__ import annotations

import copy
import os

import torch

from .power import MAX_STD, power_function_beta, std_to_exp
from .snapshots import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_NAME_RE,
    SNAPSHOT_SUBDIR,
    canonical_config_json,
    config_fingerprint,
    model_class_path,
    model_config_of,
    read_snapshot_info,
    resolve_dtype,
    snapshot_filename,
    write_snapshot,
)

COUNT_BY = ("images", "steps")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel/DataParallel and `torch.compile` wrappers (better: pass the unwrapped model)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def _averaged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32, frozen, eval-mode copy of `model` on its device.

    diffusers models are rebuilt from their config rather than deep-copied, so that wrappers patched onto the live
    model's `forward` (e.g. Accelerate's autocast) do not leak into the copy and point back at the live model.
    """
    from_config = getattr(type(model), "from_config", None)
    if from_config is not None and isinstance(getattr(model, "config", None), dict):
        net = from_config(model.config)
    else:
        net = copy.deepcopy(model)
    device = next(model.parameters()).device
    net = net.float().to(device).requires_grad_(False).eval()
    src = dict(model.named_parameters())
    for name, p in net.named_parameters():
        p.copy_(src[name])
    src = dict(model.named_buffers())
    for name, b in net.named_buffers():
        b.copy_(src[name])
    return net


class _EMATracker:
    """Shared plumbing: which model is tracked, how the copies follow its device, how buffers are copied."""

    snapshot_every_steps: int = 0

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"EMA needs a torch.nn.Module to track, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self._names = [n for n, _ in self.model.named_parameters()]
        if not self._names:
            raise ValueError("the tracked model has no parameters")
        self.num_updates = 0

    def _copies(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def _follow_device(self) -> list[torch.Tensor]:
        """Tracked parameters as float32; moves the copies if the model moved (e.g. `accelerator.prepare`)."""
        params = [p.detach() for p in self.model.parameters()]
        device = params[0].device
        for net in self._copies():
            if next(net.parameters()).device != device:
                net.to(device)
        return [p if p.dtype == torch.float32 else p.float() for p in params]

    @torch.no_grad()
    def _lerp(self, net: torch.nn.Module, params: list[torch.Tensor], beta: float) -> None:
        # θ̂ ← β θ̂ + (1 − β) θ
        torch._foreach_lerp_(list(net.parameters()), params, 1.0 - float(beta))

    @torch.no_grad()
    def _copy_buffers(self) -> None:
        src = dict(self.model.named_buffers())
        for net in self._copies():
            for name, b in net.named_buffers():
                b.copy_(src[name])

    def averaged_models(self) -> list[tuple[str, torch.nn.Module]]:
        raise NotImplementedError

    def _load_copies(self, states: list[dict]) -> None:
        copies = self._copies()
        if len(states) != len(copies):
            raise ValueError(f"EMA state holds {len(states)} averaged models, this tracker has {len(copies)}")
        for net, state in zip(copies, states):
            net.load_state_dict(state)


class PowerFunctionEMA(_EMATracker):
    """Tracks several power-function EMA profiles of one model at once (paper Section 3.1, Eq. 121 and 127).

    Args:
        model (`torch.nn.Module`): the model being trained, unwrapped (not the DDP wrapper; common wrappers are
            stripped anyway). Only a reference is kept: the tracker reads its parameters at every update.
        stds (`Sequence[float]`, defaults to `(0.05, 0.10)`): relative standard deviations σ_rel of the tracked
            profiles, each in (0, 0.2887); the paper stores 0.05 and 0.10.
        count_by (`str`, defaults to `"images"`): the EMA clock, `"images"` (training images seen, robust to batch
            size changes) or `"steps"` (optimizer steps). The profiles are scale-invariant, so with a constant batch
            size both give the same averages.
        snapshot_every_steps (`int`, defaults to 0): how often the trainer should call `save_snapshots` (0 = never;
            the package's trainer also writes one at the last step, so a run can always be exported).
        snapshot_dtype (`str`, defaults to `"float32"`): dtype snapshots store parameters in (`"float16"` halves them).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        stds=(0.05, 0.10),
        count_by: str = "images",
        snapshot_every_steps: int = 0,
        snapshot_dtype: str = "float32",
    ):
        super().__init__(model)
        if isinstance(stds, (int, float)):
            stds = [stds]
        stds = [float(s) for s in stds]
        if not stds:
            raise ValueError("ema.stds must list at least one relative standard deviation")
        std_to_exp(stds)  # raises a ValueError naming any std the power function cannot express
        labels = [self.label(s) for s in stds]
        if len(set(labels)) != len(labels):
            raise ValueError(f"ema.stds {stds} must differ in their first three decimals (labels {labels})")
        if count_by not in COUNT_BY:
            raise ValueError(f"ema.count_by must be one of {COUNT_BY}, got {count_by!r}")
        self.stds = stds
        self.count_by = count_by
        self.snapshot_every_steps = _non_negative_int("ema.snapshot_every_steps", snapshot_every_steps)
        self.snapshot_dtype = resolve_dtype(snapshot_dtype, "ema.snapshot_dtype")
        self.time = 0.0  # EMA clock after the last update (images or steps, see count_by)
        self.emas = [_averaged_copy(self.model) for _ in stds]
        self._checked_dirs: set[str] = set()

    @staticmethod
    def label(std: float) -> str:
        """Name of a profile, e.g. `ema-0.050`; also the folder name reconstruction writes."""
        return f"ema-{std:.3f}"

    def _copies(self):
        return self.emas

    @torch.no_grad()
    def update(self, cur_nimg: int | None = None, batch_size: int | None = None, *, step: int | None = None) -> None:
        """Fold the model's current parameters into every profile; call once after each optimizer step.

        Args:
            cur_nimg (`int`): global training images seen so far, *including* the batch of this step.
                Required when counting by images.
            batch_size (`int`, *optional*): global images of this step (Δt of Eq. 127); defaults to the images
                seen since the previous update.
            step (`int`, *optional*): optimizer steps done so far, including this one (counting by steps);
                defaults to one more than the previous update.
        """
        if self.count_by == "images":
            if cur_nimg is None:
                raise ValueError("PowerFunctionEMA(count_by='images').update needs cur_nimg (images seen so far)")
            t_next = float(cur_nimg)
            t_delta = float(batch_size) if batch_size is not None else t_next - self.time
        else:
            t_next = float(step) if step is not None else self.time + 1.0
            t_delta = t_next - self.time
        if not t_next > self.time:
            raise ValueError(
                f"EMA time must increase at every update: got {t_next:g} {self.count_by} after {self.time:g}"
            )
        if not 0 < t_delta <= t_next:
            raise ValueError(f"EMA update of {t_delta:g} {self.count_by} at time {t_next:g} is invalid")
        params = self._follow_device()
        for std, net in zip(self.stds, self.emas):
            self._lerp(net, params, power_function_beta(std, t_next, t_delta))
        self.time = t_next
        self.num_updates += 1

    def averaged_models(self) -> list[tuple[str, torch.nn.Module]]:
        """`[(label, module), ...]`, one per tracked std, with buffers refreshed from the model."""
        self._copy_buffers()
        return [(self.label(s), net) for s, net in zip(self.stds, self.emas)]

    def state_dict(self) -> dict:
        """Plain numbers, strings and tensors (torch.save/torch.load safe, also with `weights_only=True`)."""
        return {
            "type": "power",
            "stds": list(self.stds),
            "count_by": self.count_by,
            "time": float(self.time),
            "num_updates": int(self.num_updates),
            "emas": [dict(net.state_dict()) for net in self.emas],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != "power":
            raise ValueError(f"EMA checkpoint holds a {state.get('type')!r} EMA, this run tracks a power-function EMA")
        stds = [float(s) for s in state["stds"]]
        if [round(s, 6) for s in stds] != [round(s, 6) for s in self.stds]:
            raise ValueError(f"EMA checkpoint tracks stds {stds}, this run's config asks for {self.stds}")
        if state["count_by"] != self.count_by:
            raise ValueError(f"EMA checkpoint counts by {state['count_by']}, this run's config by {self.count_by}")
        self._load_copies(state["emas"])
        self.time = float(state["time"])
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def save_snapshots(self, output_dir: str, step: int, nimg: int, dtype=None) -> list[str]:
        """Write each tracked profile to `output_dir/phema/phema-<step:09d>-<std:.3f>.safetensors` (main process only).

        Each file is written atomically and carries the metadata reconstruction needs (see `snapshots.py`).

        Args:
            output_dir (`str`): the run's output folder.
            step (`int`): optimizer steps done so far (names the file).
            nimg (`int`): training images seen so far.
            dtype (`str` or `torch.dtype`, *optional*): storage dtype of the parameters; defaults to
                `snapshot_dtype`. Buffers keep their own dtype.

        Returns:
            `list[str]`: the paths written.
        """
        if int(step) < 1 or self.num_updates == 0:
            raise ValueError(
                f"EMA snapshots need at least one update and step >= 1 (step={step}, updates={self.num_updates})"
            )
        dtype = self.snapshot_dtype if dtype is None else resolve_dtype(dtype)
        config = model_config_of(self.model)
        fingerprint = config_fingerprint(config)
        directory = os.path.join(output_dir, SNAPSHOT_SUBDIR)
        self._check_existing(directory, fingerprint)
        buffer_names = [n for n, _ in self.emas[0].named_buffers() if n in self.emas[0].state_dict()]
        self._copy_buffers()
        paths = []
        for std, net in zip(self.stds, self.emas):
            tensors = {
                k: (v.to(dtype) if k not in buffer_names and v.is_floating_point() else v)
                for k, v in net.state_dict().items()
            }
            metadata = {
                "format": SNAPSHOT_FORMAT,
                "step": str(int(step)),
                "nimg": str(int(nimg)),
                "time": repr(float(self.time)),
                "count_by": self.count_by,
                "std": repr(float(std)),
                "model_class": model_class_path(self.model),
                "model_config": canonical_config_json(config),
                "fingerprint": fingerprint,
                "buffer_names": canonical_config_json(buffer_names),
            }
            paths.append(write_snapshot(os.path.join(directory, snapshot_filename(step, std)), tensors, metadata))
        return paths

    def _check_existing(self, directory: str, fingerprint: str) -> None:
        """Refuse to add snapshots to a folder holding snapshots of a different model config (checked once)."""
        if directory in self._checked_dirs or not os.path.isdir(directory):
            self._checked_dirs.add(directory)
            return
        for name in sorted(os.listdir(directory)):
            if SNAPSHOT_NAME_RE.fullmatch(name):
                path = os.path.join(directory, name)
                if read_snapshot_info(path).fingerprint != fingerprint:
                    raise ValueError(
                        f"{directory} already holds snapshots of a different model config ({path}); "
                        "use a fresh output_dir for this run"
                    )
        self._checked_dirs.add(directory)


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


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


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
