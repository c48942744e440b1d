"""The default sampler of an export: the run's EDM Heun sampler, or the setting the EMA sweep chose.

A sweep over samplers (``examples/sweep_ema.py --samplers heun:18,dpmsolver:18,dpmsolver:10``) records in its
``best.json`` the best setting (``sampler``) and the cheapest one whose metric lies within ``--margin`` of the best
(``cheapest``), both measured at the best EMA std. An export stores one of them as its pipeline's scheduler (built
from the run's σ range, ρ and σ_data by :meth:`~edm2_diffusers.schedulers.samplers.SamplerSetting.make_scheduler`,
as the sweep built it) and its step count as the pipeline's ``default_num_inference_steps``, so that
``from_pretrained(export)()`` samples with it. ``sampler`` chooses:

* ``"cheapest"`` (the default): the sweep's cheapest setting within its margin of the best;
* ``"best"``: the sweep's best setting;
* ``"heun"``: the run's Heun sampler at its step count, whatever the sweep found.

The sweep's choice is taken only where its measurement describes the exported weights; otherwise the Heun sampler is
kept and the reason logged (and written to ``export_info.json``):

1. the export is of post-hoc EMA reconstructions (a single given model was not swept);
2. no ``num_inference_steps`` was given (an explicit step count means the run's Heun sampler at that count);
3. a sweep ran and compared samplers (``--samplers`` with two settings or more; a sweep of one sampler chose none);
4. the sweep ran at the exported training step (other steps are other weights);
5. the sweep's best EMA std, where the setting was measured, is one of the exported stds.
"""

from __future__ import annotations

import logging

from ..schedulers import EDMHeunScheduler
from ..schedulers.samplers import SamplerSetting, scheduler_name
from .layout import variant_name

logger = logging.getLogger(__name__)

SAMPLER_CHOICES = ("cheapest", "best", "heun")
DEFAULT_SAMPLER = "cheapest"
HEUN = EDMHeunScheduler.__name__
# Keys of an export's ``sampling`` that are not arguments of the Heun scheduler it is built from.
_NOT_SCHEDULER_ARGS = ("scheduler", "num_inference_steps", "nfe")


def check_sampler_choice(sampler: str) -> str:
    """``sampler`` if it is one of :data:`SAMPLER_CHOICES`, else a `ValueError` naming them."""
    if sampler not in SAMPLER_CHOICES:
        raise ValueError(f"sampler {sampler!r} is not one of {', '.join(SAMPLER_CHOICES)}")
    return sampler


def build_scheduler(sampling: dict):
    """The scheduler of an export's ``sampling``: its ``scheduler`` class (default ``EDMHeunScheduler``) with the
    run's Heun settings (σ range, ρ, σ_data; options a scheduler does not take are left out, as in the sweep)."""
    heun = EDMHeunScheduler(**{k: v for k, v in sampling.items() if k not in _NOT_SCHEDULER_ARGS})
    name = sampling.get("scheduler") or HEUN
    if name == HEUN:
        return heun
    return SamplerSetting(scheduler_name(name), int(sampling["num_inference_steps"])).make_scheduler(heun)


def heun_arguments(sampling: dict) -> str:
    """``EDMHeunScheduler(...)``'s keyword arguments of an export's ``sampling``, as Python source (for the card)."""
    return ", ".join(f"{k}={v!r}" for k, v in sampling.items() if k not in _NOT_SCHEDULER_ARGS)


def sampler_nfe(scheduler: str | None, num_inference_steps: int) -> int:
    """Network evaluations of one image with ``scheduler`` (class name; Heun when ``None``) at that step count."""
    return SamplerSetting(scheduler_name(scheduler or HEUN), int(num_inference_steps)).nfe


def _heun(sampling: dict) -> dict:
    steps = int(sampling["num_inference_steps"])
    return {**sampling, "scheduler": HEUN, "num_inference_steps": steps, "nfe": sampler_nfe(HEUN, steps)}


def _refusal(sampler: str, sweep: dict, step: int, stds: list, explicit_steps: int | None) -> tuple[str, bool]:
    """Why the sweep's ``sampler`` setting does not apply to this export, and whether that deserves a warning (a
    sweep of other weights); ``("", False)`` when it applies."""
    if None in stds:
        return "the export is one given model, not post-hoc EMA reconstructions the sweep measured", False
    if explicit_steps is not None:
        return f"num_inference_steps={explicit_steps} was given", False
    if not sweep:
        return "no EMA sweep ran (no best.json)", False
    entry = sweep.get("cheapest" if sampler == "cheapest" else "sampler")
    settings = {(r.get("scheduler"), r.get("num_inference_steps")) for r in sweep.get("samplers") or []}
    if entry is None or "num_inference_steps" not in entry or len(settings) < 2:
        return f"the EMA sweep {sweep['path']} compared no samplers (run it with --samplers)", False
    if sweep.get("step") != step:
        return f"the EMA sweep ran at training step {sweep.get('step')}, this export is of step {step}", True
    sweep_std = float(entry.get("std", sweep["std"]))
    if not any(abs(float(s) - sweep_std) < 5e-7 for s in stds):
        exported = ", ".join(f"{float(s):g}" for s in stds)
        return (
            f"the EMA sweep measured its samplers at EMA std {sweep_std:g}, which is not exported ({exported})",
            True,
        )
    return "", False


def choose_sampler(
    sampler: str, sweep: dict, step: int, stds: list, sampling: dict, explicit_steps: int | None = None
) -> tuple[dict, dict]:
    """The export's sampler settings and the record of how they were chosen (rules in the module's docstring).

    Args:
        sampler (`str`): ``"cheapest"``, ``"best"`` or ``"heun"``.
        sweep (`dict`): :func:`edm2_diffusers.runs.read_sweep` of the run (``{}`` when no sweep ran).
        step (`int`): the exported training step.
        stds (`list`): the exported EMA stds (``[None]`` for one given model).
        sampling (`dict`): the run's Heun settings (:func:`edm2_diffusers.runs.sampling_settings`).
        explicit_steps (`int`, *optional*): the step count the export was given.

    Returns:
        `tuple[dict, dict]`: ``sampling`` with ``scheduler`` (class name), ``num_inference_steps`` and ``nfe``; and
        the choice: ``{"sampler": "heun", "requested", "reason"}`` when the Heun sampler is kept, else the sweep's
        setting with ``std``, ``variant``, ``metric``, its ``value``, the ``best`` setting and value, ``margin``,
        ``threshold`` and the ``heun`` step count and NFE it replaces.
    """
    check_sampler_choice(sampler)
    heun = _heun(sampling)
    if sampler == "heun":
        return heun, {"sampler": "heun", "requested": "heun", "reason": "the Heun sampler was asked for"}
    reason, warn = _refusal(sampler, sweep, step, stds, explicit_steps)
    if reason:
        log = logger.warning if warn else logger.info
        log("the export keeps the Heun sampler (%d steps) as its default: %s", heun["num_inference_steps"], reason)
        return heun, {"sampler": "heun", "requested": sampler, "reason": reason}
    entry = sweep["cheapest"] if sampler == "cheapest" else sweep["sampler"]
    best = sweep["sampler"] or {}
    std, metric = float(entry.get("std", sweep["std"])), sweep.get("metric")
    best_value = (sweep.get("metrics", {}).get(sweep["std"]) or {}).get(metric)
    steps = int(entry["num_inference_steps"])
    chosen = {**sampling, "scheduler": entry["scheduler"], "num_inference_steps": steps}
    build_scheduler(chosen)  # an unknown scheduler fails here, before any work
    chosen["nfe"] = sampler_nfe(entry["scheduler"], steps)
    choice = {
        "sampler": sampler,
        "scheduler": entry["scheduler"],
        "num_inference_steps": steps,
        "nfe": chosen["nfe"],
        "std": std,
        "variant": variant_name(std),
        "metric": metric,
        "value": entry.get("value", best_value),
        "best": {k: best.get(k) for k in ("scheduler", "num_inference_steps", "nfe")} | {"value": best_value},
        "margin": entry.get("margin") or (sweep.get("settings") or {}).get("margin"),
        "threshold": entry.get("threshold"),
        "heun": {"num_inference_steps": heun["num_inference_steps"], "nfe": heun["nfe"]},
        "sweep_step": sweep.get("step"),
    }
    logger.info(
        "default sampler from the EMA sweep (%s): %s, %d steps (%d network evaluations)",
        sampler,
        entry["scheduler"],
        steps,
        chosen["nfe"],
    )
    return chosen, choice


__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLER_CHOICES",
    "build_scheduler",
    "check_sampler_choice",
    "choose_sampler",
    "heun_arguments",
    "sampler_nfe",
]
