"""Post-hoc EMA reconstruction (paper Section 3.1, Appendix C.3): any EMA length, after training.

Given the snapshots a run wrote (`<run_dir>/phema/`), the weights of a power-function EMA of any std at a snapshot step
are approximated by Σ_i X[i, j] θ̂_i, with X from `solve_posthoc_coefficients` (Algorithm 3). Reconstruction streams:
each snapshot is read once, and memory holds one snapshot plus the outputs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from .power import solve_posthoc_coefficients
from .snapshots import SnapshotInfo, list_snapshots, load_snapshot
from .trackers import PowerFunctionEMA


@dataclass
class PostHocEMAReconstruction:
    """Result of `reconstruct`. Iterating yields `(std, state_dict)` pairs.

    Args:
        stds (`list[float]`): the reconstructed relative standard deviations.
        state_dicts (`list[dict[str, torch.Tensor]]`): float32 weights, one per std, on the CPU.
        step (`int`): optimizer step the profiles end at.
        nimg (`int`): training images seen at that step.
        model_class (`str`): qualified class name of the model (`module.Class`).
        model_config (`dict`): the model's constructor config.
        coefficients (`np.ndarray`): `[len(snapshots), len(stds)]` weights of the snapshots.
        snapshots (`list[SnapshotInfo]`): the snapshots used, in reading order.
    """

    stds: list
    state_dicts: list
    step: int
    nimg: int
    model_class: str
    model_config: dict
    coefficients: object
    snapshots: list = field(default_factory=list)

    def __iter__(self):
        return iter(zip(self.stds, self.state_dicts))

    def __len__(self) -> int:
        return len(self.stds)

    def model(self, index: int = 0) -> torch.nn.Module:
        """Build the model of output `index` (float32, eval mode) from the recorded class and config."""
        cls = resolve_model_class(self.model_class)
        net = cls.from_config(self.model_config) if hasattr(cls, "from_config") else cls(**self.model_config)
        net.load_state_dict(self.state_dicts[index])
        return net.eval()


def resolve_model_class(path: str):
    """Import the model class a snapshot names; only classes of this package or diffusers are accepted."""
    module_name, _, name = path.rpartition(".")
    if module_name.split(".")[0] not in ("edm2_diffusers", "diffusers"):
        raise ValueError(f"snapshot model class {path!r} is not an edm2_diffusers or diffusers model")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import snapshot model class {path!r}: {e}") from e


def _select(snapshots: list[SnapshotInfo], step: int | None) -> list[SnapshotInfo]:
    """Check that the snapshots belong together and keep those at or before `step` (default: the last step)."""
    first = snapshots[0]
    for snap in snapshots[1:]:
        if snap.fingerprint != first.fingerprint:
            raise ValueError(
                f"snapshots of different model configs are mixed in one folder: {first.path} and {snap.path} "
                "have different config fingerprints; keep one run per output_dir"
            )
        if snap.count_by != first.count_by:
            raise ValueError(
                f"snapshots count EMA time differently: {first.path} by {first.count_by}, "
                f"{snap.path} by {snap.count_by}"
            )
    steps = sorted({s.step for s in snapshots})
    if step is None:
        step = steps[-1]
    step = int(step)
    if step < steps[0]:
        raise ValueError(f"no EMA snapshot at or before step {step}: the earliest snapshot is at step {steps[0]}")
    if step not in steps:
        before = [s for s in steps if s < step]
        raise ValueError(
            f"no EMA snapshot at step {step}; reconstruct at a snapshot step, e.g. {before[-1]} "
            f"(steps with snapshots: {steps[0]}..{steps[-1]})"
        )
    used = [s for s in snapshots if s.step <= step and s.time > 0]
    times = {s.time for s in used if s.step == step}
    if len(times) != 1:
        raise ValueError(f"snapshots at step {step} disagree on the EMA time ({sorted(times)})")
    return used


def profile_folders(stds) -> dict[float, str]:
    """The folder name of each EMA std (``ema-0.050``, :meth:`PowerFunctionEMA.label`), duplicates dropped.

    The one place that checks names: reconstruction and the pipeline export both write one folder per std.

    Raises:
        ValueError: two different stds round to the same folder (names have 3 decimals), which would overwrite one.
    """
    folders: dict[float, str] = {}
    owner: dict[str, float] = {}
    for std in dict.fromkeys(float(s) for s in stds):
        name = PowerFunctionEMA.label(std)
        if name in owner:
            raise ValueError(
                f"EMA stds {owner[name]} and {std} share the folder {name}; folders are named to 3 decimals, so one "
                "would overwrite the other. Give stds that differ in the first 3 decimals"
            )
        owner[name] = std
        folders[std] = name
    return folders


def reconstruct(run_dir: str, stds, step: int | None = None) -> PostHocEMAReconstruction:
    """Reconstruct power-function EMA weights of the given stds at a snapshot step of a run.

    Args:
        run_dir (`str`): the training run's output folder (holding `phema/`), or the `phema/` folder itself.
        stds (`float` or `Sequence[float]`): target relative standard deviations, each in (0, 0.2887).
        step (`int`, *optional*): the optimizer step to reconstruct at; must be a step with snapshots. Defaults to
            the last one. Only snapshots at or before it are used.

    Returns:
        `PostHocEMAReconstruction`: iterate it for `(std, state_dict)` pairs; it also carries the model class and
        config to rebuild the network (`.model(i)`).
    """
    if isinstance(stds, (int, float)):
        stds = [stds]
    stds = list(dict.fromkeys(float(s) for s in stds))
    if not stds:
        raise ValueError("give at least one std to reconstruct")
    used = _select(list_snapshots(run_dir), step)
    target = [s for s in used if s.step == max(u.step for u in used)][0]
    coefs = solve_posthoc_coefficients(
        [s.time for s in used], [s.std for s in used], target.time, stds
    )  # raises naming any std the power function cannot express
    coefs_t = torch.as_tensor(coefs, dtype=torch.float64)

    outputs: list[dict[str, torch.Tensor]] | None = None
    reference: dict | None = None
    buffers = set(target.buffer_names)
    for i, snap in enumerate(used):
        tensors = load_snapshot(snap.path)
        layout = {k: tuple(v.shape) for k, v in tensors.items()}
        if reference is None:
            reference = layout
            outputs = [
                {
                    k: torch.zeros(v.shape, dtype=torch.float32) if v.is_floating_point() else v.clone()
                    for k, v in tensors.items()
                }
                for _ in stds
            ]
        elif layout != reference:
            raise ValueError(f"EMA snapshot {snap.path} holds different tensors than {used[0].path}")
        for name, value in tensors.items():
            if not value.is_floating_point() or name in buffers:
                for out in outputs:  # buffers and integer tensors are copied (the latest snapshot wins)
                    out[name] = value.to(torch.float32) if value.is_floating_point() else value.clone()
                continue
            value = value.to(torch.float32)
            for j, out in enumerate(outputs):
                out[name].add_(value, alpha=float(coefs_t[i, j]))
        del tensors
    return PostHocEMAReconstruction(
        stds=stds,
        state_dicts=outputs,
        step=target.step,
        nimg=target.nimg,
        model_class=target.model_class,
        model_config=target.model_config,
        coefficients=coefs,
        snapshots=used,
    )
