"""EMA trackers used during training: power-function EMA (paper Section 3.1), a traditional fixed-β EMA, and a
traditional EMA with power-function profiles tracked beside it (`TraditionalEMAWithPostHoc`).

The trainer calls, in this order::

    ema = build_ema(unwrapped_model, cfg["ema"])
    accelerator.register_for_checkpointing(ema)           # state_dict()/load_state_dict(): resume is exact
    ...after every optimizer step...
    ema.update(cur_nimg=images_seen_including_this_batch, batch_size=global_batch_size)
    ema.after_step(output_dir, step=step, nimg=images_seen, final=step == last)  # main process: snapshots
    for label, net in ema.averaged_models(): ...           # sampling / evaluation

The averaged copies are float32 modules on the tracked model's device, kept outside the model (never registered as
its submodules). Parameters are averaged; buffers (e.g. Fourier frequencies) are copied from the model.
"""

from __future__ import annotations

import copy
import os

import torch

from .power import power_function_beta, std_to_exp
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

    def after_step(self, output_dir: str, step: int, nimg: int, final: bool = False) -> list[str]:
        """What the tracker writes after optimizer step ``step`` (``final``: the run's last); the files written."""
        return []

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

    def after_step(self, output_dir: str, step: int, nimg: int, final: bool = False) -> list[str]:
        """Snapshots every ``snapshot_every_steps`` and always at the run's last step, so that a run can be exported
        and reconstructed where it ends (also with ``snapshot_every_steps`` 0)."""
        every = self.snapshot_every_steps
        if (every and step % every == 0) or final:
            return self.save_snapshots(output_dir, step=step, nimg=nimg)
        return []

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


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


__all__ = ["COUNT_BY", "PowerFunctionEMA", "unwrap_model"]
