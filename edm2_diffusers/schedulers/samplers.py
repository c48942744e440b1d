"""Sampler settings: a scheduler and a step count, and what they cost in network evaluations.

The EMA sweep (``edm2_diffusers.evaluation.sweep``) evaluates these settings and an export
(``edm2_diffusers.hub.sampler_choice``) stores the one the sweep chose as its pipeline's scheduler; both build the
scheduler with :meth:`SamplerSetting.make_scheduler`, so an export samples exactly as the sweep measured.

Three EDM schedulers drive an :class:`~edm2_diffusers.EDM2Pipeline` on the same σ schedule (Karras et al. 2022, Eq. 5):

* ``heun``: :class:`~edm2_diffusers.EDMHeunScheduler`, EDM's 2nd-order sampler (Algorithm 1): two network evaluations
  per step but one on the last step, whose σ_next = 0, so **2N − 1** for N steps (35 at 18 steps);
* ``dpmsolver``: diffusers' ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++(2M), Lu et al. 2022), which reuses the
  previous step's output for its 2nd order: **N**;
* ``euler``: diffusers' ``EDMEulerScheduler``, 1st order: **N**.

Each is built from the run's Heun scheduler config (σ range, ρ, σ_data), so only the solver changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from .scheduling_edm_heun import EDMHeunScheduler

SCHEDULERS = {
    "heun": EDMHeunScheduler,
    "dpmsolver": EDMDPMSolverMultistepScheduler,
    "euler": EDMEulerScheduler,
}
_ALIASES = {"dpm": "dpmsolver", "dpm-solver": "dpmsolver", "dpmsolver++": "dpmsolver"}
_ALIASES.update({cls.__name__.lower(): name for name, cls in SCHEDULERS.items()})


@dataclass(frozen=True)
class SamplerSetting:
    """A scheduler (short name, see :data:`SCHEDULERS`) and a step count."""

    scheduler: str
    num_inference_steps: int

    @property
    def nfe(self) -> int:
        """Network evaluations of one image: Heun 2N − 1, DPM-Solver and Euler N."""
        n = self.num_inference_steps
        return 2 * n - 1 if self.scheduler == "heun" else n

    @property
    def scheduler_class(self) -> str:
        """The diffusers class name (what a pipeline's ``scheduler_config.json`` records)."""
        return SCHEDULERS[self.scheduler].__name__

    @property
    def label(self) -> str:
        return f"{self.scheduler} {self.num_inference_steps}"

    def make_scheduler(self, base: EDMHeunScheduler):
        """This setting's scheduler with ``base``'s σ range, ρ and σ_data (options it does not take are left out)."""
        cls = SCHEDULERS[self.scheduler]
        accepted = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in base.config.items() if k in accepted})


def scheduler_name(name: str) -> str:
    """The short name of a scheduler given by short name, alias or diffusers class name (case-insensitive)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return key


def parse_samplers(spec, default_steps: int = 18) -> list[SamplerSetting]:
    """Sampler settings from ``"heun:18,dpmsolver:18,dpmsolver:10"`` (a name alone takes ``default_steps``).

    Also accepts a list of such strings or of ``(name, steps)`` pairs. Duplicates are dropped, order is kept.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[SamplerSetting] = []
    for item in items:
        if isinstance(item, SamplerSetting):
            setting = item
        else:
            name, _, steps = item.partition(":") if isinstance(item, str) else (item[0], ":", item[1])
            if not str(name).strip():
                continue
            try:
                steps = int(steps) if str(steps).strip() else int(default_steps)
            except ValueError:
                raise ValueError(f"sampler {item!r}: the step count must be an integer (e.g. dpmsolver:10)") from None
            if steps < 1:
                raise ValueError(f"sampler {item!r}: the step count must be at least 1")
            setting = SamplerSetting(scheduler_name(name), steps)
        if setting not in out:
            out.append(setting)
    if not out:
        raise ValueError(f"no sampler setting in {spec!r}; expected e.g. 'heun:18,dpmsolver:10'")
    return out


__all__ = ["SCHEDULERS", "SamplerSetting", "parse_samplers", "scheduler_name"]
