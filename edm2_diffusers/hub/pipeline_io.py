"""The package side of ``EDM2Pipeline.from_pretrained``, ``save_pretrained`` and ``push_to_hub``.

``pipelines/pipeline_edm2.py`` is bundled into exports as custom code and sits on the ground floor, so it may not
import this layer; instead the class looks this module up in ``sys.modules`` (the package root imports it). So
with the package installed:

* ``EDM2Pipeline.from_pretrained(path_or_repo, variant=..., torch_dtype=...)`` builds the package's own classes
  (:func:`~edm2_diffusers.hub.loading.load_pipeline`), no remote code;
* ``save_pretrained(dir)`` writes diffusers' files and then :func:`save_pipeline_files` adds what an export has:
  the custom code, ``export_info.json`` and the model card, so ``DiffusionPipeline.from_pretrained(dir,
  trust_remote_code=True)`` loads it where the package is not installed. A pipeline that was itself loaded as remote
  code (its classes come from diffusers' module cache) gets the standalone files it was loaded from
  (``EDM2Pipeline._copy_own_code``, which the bundled copy also uses where the package is absent);
* ``push_to_hub(repo)`` saves into a temporary folder and pushes it with :func:`edm2_diffusers.hub.push_to_hub`
  (one commit that also deletes stale files).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import diffusers

from .. import __version__
from ..pipelines import EDM2Pipeline
from .layout import EXPORT_FORMAT, EXPORT_INFO_NAME, FORMAT_VERSION
from .loading import load_pipeline
from .model_card import write_model_card
from .push import push_to_hub
from .remote_code import write_custom_code

# The sections of an export's info a saved pipeline keeps (where its weights come from); the rest is recomputed.
KEPT_SECTIONS = ("run", "dataset", "training", "ema", "latent", "conversion", "base_model", "license", "tags")


def is_package_class(cls: type) -> bool:
    """Whether ``cls`` is this package's ``EDM2Pipeline`` (or a subclass), not a copy loaded as remote code."""
    return issubclass(cls, EDM2Pipeline)


def _is_remote(obj) -> bool:
    return type(obj).__module__.startswith("diffusers_modules.")


def _earlier_info(pipe) -> dict:
    """The export info of the local folder the pipeline was loaded from, if any."""
    origin = getattr(pipe.config, "_name_or_path", None)
    path = Path(origin, EXPORT_INFO_NAME) if origin and os.path.isdir(origin) else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def pipeline_info(pipe, repo_id: str | None = None) -> dict:
    """The ``export_info.json`` of a saved pipeline: its networks and sampler, and where it came from."""
    unet = pipe.unet
    earlier = _earlier_info(pipe)
    sched = dict(pipe.scheduler.config)
    sampling = {k: sched[k] for k in ("sigma_min", "sigma_max", "rho", "sigma_data", "s_churn") if k in sched}
    stored = pipe.config.get("default_num_inference_steps")
    sampling["num_inference_steps"] = stored or (earlier.get("sampling") or {}).get("num_inference_steps")
    sampling["num_inference_steps"] = sampling["num_inference_steps"] or type(pipe).DEFAULT_NUM_INFERENCE_STEPS
    sampling["scheduler"] = type(pipe.scheduler).__name__
    origin = getattr(pipe.config, "_name_or_path", None)
    origin = os.fspath(origin) if origin else None
    name = repo_id.split("/")[-1] if repo_id else (Path(origin).name if origin else "edm2-pipeline")
    info = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "diffusers_version": diffusers.__version__,
        "model_name": earlier.get("model_name") or name,
        "license": "apache-2.0",
        "tags": [],
        "repo_id": repo_id or earlier.get("repo_id") or f"your-username/{name}",
        **{k: earlier[k] for k in KEPT_SECTIONS if k in earlier},
        "origin": {"name_or_path": origin} if origin else {},
        "model": {
            "class": f"{type(unet).__module__}.{type(unet).__name__}",
            "config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "num_parameters": int(sum(p.numel() for p in unet.parameters())),
            "num_parameters_without_logvar": int(unet.num_parameters_without_logvar()),
        },
        "sampling": sampling,
        "variants": [{"std": None, "variant": None, "metrics": {}}],
        "sample_grid": None,
        "sample_seed": None,
    }
    # The EMA sweep's choice of the default sampler still holds while the pipeline samples as it was exported.
    earlier_sampling = earlier.get("sampling") or {}
    exported = [earlier_sampling.get("scheduler"), earlier_sampling.get("num_inference_steps")]
    if earlier.get("sampler_choice") and exported == [sampling["scheduler"], sampling["num_inference_steps"]]:
        info["sampler_choice"] = earlier["sampler_choice"]
    if pipe.vae is not None and "latent" in info:
        info["latent"] = {**info["latent"], "vae_included": True}
    return info


def save_pipeline_files(pipe, save_directory: str | os.PathLike, repo_id: str | None = None) -> None:
    """Add the custom code, ``export_info.json`` and model card to a folder ``save_pretrained`` wrote."""
    save_directory = Path(save_directory)
    if _is_remote(pipe):
        pipe._copy_own_code(save_directory)  # the standalone files it was loaded from: the code that made it
    else:
        write_custom_code(save_directory)
    info = pipeline_info(pipe, repo_id)
    write_model_card(save_directory, info, info["repo_id"])


def push_pipeline(pipe, repo_id: str, private: bool = False, token: str | None = None, commit_message=None, **kwargs):
    """``pipe.push_to_hub``: save the pipeline as an export and push it in one commit (stale files deleted)."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, **kwargs)  # push_to_hub renders the card again for repo_id
        return push_to_hub(tmp, repo_id, private=private, token=token, commit_message=commit_message)


__all__ = ["is_package_class", "load_pipeline", "pipeline_info", "push_pipeline", "save_pipeline_files"]
