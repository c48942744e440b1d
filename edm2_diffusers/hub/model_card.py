"""The model card (``README.md``) of a pipeline export, rendered from the packaged jinja template.

Everything the card says comes from the export's ``export_info.json`` (written by
:func:`edm2_diffusers.hub.export_pipelines`), so a card can be rendered again, e.g. with the final repository id when
the export is pushed. The template is package data: ``edm2_diffusers/hub/templates/edm2_pipeline.md``
(``model_cards/edm2_pipeline.md`` in the repository links to it).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..files import write_json_atomic, write_text_atomic
from .layout import EXPORT_INFO_NAME
from .sampler_choice import HEUN, heun_arguments, sampler_nfe

TEMPLATE_NAME = "edm2_pipeline.md"

CITATION = """@inproceedings{karras2024edm2,
  title     = {Analyzing and Improving the Training Dynamics of Diffusion Models},
  author    = {Karras, Tero and Aittala, Miika and Lehtinen, Jaakko and Hellsten, Janne and Aila, Timo and
               Laine, Samuli},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""

# Rows of the "Model" table taken from the run's training config, when present: (config key, label).
TRAINING_ROWS = (
    ("learning_rate", "reference learning rate α_ref"),
    ("total_batch_size", "batch size"),
    ("lr_decay_ref_images", "learning-rate decay t_ref (images)"),
    ("P_mean", "P_mean (training noise distribution)"),
    ("P_std", "P_std (training noise distribution)"),
    ("mixed_precision", "mixed precision"),
)


def template_text(name: str = TEMPLATE_NAME) -> str:
    """The text of a packaged model-card template.

    Args:
        name (`str`): file name under ``edm2_diffusers/hub/templates/``.
    """
    resource = importlib.resources.files("edm2_diffusers.hub").joinpath("templates", name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"model card template {name!r} is not in the installed package (edm2_diffusers/hub/templates)"
        )
    return resource.read_text(encoding="utf-8")


# How the card labels metrics of the EMA sweep (raw names as in best.json).
METRIC_LABELS = {"fid": "FID", "fd": "FD", "confident": "confident share"}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name.lower(), name)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_ema(ema: dict | None) -> str:
    """How the weights of a single-model export (:func:`~edm2_diffusers.hub.export_model`) were averaged."""
    if ema is None:
        return "post-hoc EMA"
    if ema.get("type") == "traditional":
        text = f"traditional EMA (β = {float(ema['beta']):g} per step"
        if ema.get("warmup_steps"):
            text += f", warmed up over {int(ema['warmup_steps']):,} steps"
        return text + ")"
    if ema.get("type") == "none":
        return "raw training weights (no EMA)"
    return f"{ema.get('type')} EMA"


def _variant_rows(info: dict) -> tuple[list[dict], list[str]]:
    metric_names = list(dict.fromkeys(n for v in info["variants"] for n in v.get("metrics", {})))
    ema_text = describe_ema(info.get("ema"))
    rows = []
    for i, v in enumerate(info["variants"]):
        metrics = v.get("metrics", {})
        cells = "".join(f" {_fmt(metrics[n]) if n in metrics else '–'} |" for n in metric_names)
        std_text = f"{v['std']:.3f}" if v["std"] is not None else ema_text
        variant = f"`{v['variant']}`" if v.get("variant") else "–"
        rows.append(
            dict(
                std=v["std"],
                std_text=std_text,
                variant=v.get("variant"),
                variant_text=variant + (" (default)" if i == 0 and v.get("variant") else ""),
                source=v.get("source"),
                metric_cells=cells,
            )
        )
    return rows, metric_names


def sampler_context(info: dict) -> dict:
    """The card's default sampler: scheduler class, steps, NFE, the Heun arguments, and the EMA sweep's choice
    (``info["sampler_choice"]``) when the sampler came from it."""
    sampling = info["sampling"]
    name, steps = sampling.get("scheduler") or HEUN, int(sampling["num_inference_steps"])
    try:
        nfe = sampling.get("nfe") or sampler_nfe(name, steps)
    except ValueError:  # a scheduler the sweep does not know: its cost is not stated
        nfe = None
    choice = info.get("sampler_choice") or {}
    chosen = dict(choice) if choice.get("sampler") in ("cheapest", "best") else None
    if chosen is not None:
        for key in ("value", "threshold"):
            chosen[key + "_text"] = _fmt(chosen.get(key))
        chosen["best_value_text"] = _fmt(chosen["best"].get("value"))
        chosen["metric_text"] = metric_label(chosen.get("metric") or "metric")
    return dict(
        scheduler=name, is_heun=name == HEUN, steps=steps, nfe=nfe, choice=chosen, heun=heun_arguments(sampling)
    )


def card_context(info: dict, repo_id: str) -> dict:
    """The template variables of a card, from an export's ``export_info.json`` content.

    Args:
        info (`dict`): the export info.
        repo_id (`str`): the repository id (or local path) the usage snippets load from.
    """
    model = info["model"]
    config = model["config"]
    variants, metric_names = _variant_rows(info)
    training = info.get("training") or {}
    training_rows = [(label, _fmt(training[key])) for key, label in TRAINING_ROWS if training.get(key) is not None]
    history = (info.get("run") or {}).get("history") or {}
    for change in history.get("changed_on_resume", []):  # settings changed on resume
        for key, values in change["overrides"].items():
            training_rows.append(
                (f"`{key}` from step {change['step']:,} (resumed)", f"{values['from']} → {values['to']}")
            )
    run = info.get("run")
    return dict(
        model_name=info["model_name"],
        repo_id=repo_id,
        architecture=config["architecture"],
        num_parameters=f"{model['num_parameters']:,}",
        num_parameters_without_logvar=f"{model['num_parameters_without_logvar']:,}",
        num_parameters_human=_human(model["num_parameters"]),
        resolution=config["sample_size"],
        in_channels=config["in_channels"],
        model_channels=config["model_channels"],
        channel_mult=", ".join(str(m) for m in config["channel_mult"]),
        num_blocks=config["num_blocks"],
        attn_resolutions=", ".join(f"{r}×{r}" for r in config["attn_resolutions"]) or "none",
        num_classes=config.get("num_class_embeds"),
        posthoc=info.get("ema") is None and variants[0]["std"] is not None,
        ema_text=describe_ema(info.get("ema")),
        latent=info.get("latent"),
        run=run,
        step=f"{run['step']:,}" if run else None,
        images_seen=f"{run['nimg']:,}" if run else None,
        images_seen_human=_human(run["nimg"]) if run else None,
        conversion=info.get("conversion"),
        origin=info.get("origin"),
        guidance=info.get("guidance"),
        base_model=info.get("base_model"),
        license=info.get("license"),
        dataset_text=(info.get("dataset") or {}).get("text"),
        variants=variants,
        has_variants=variants[0]["variant"] is not None,
        metric_header="".join(f" {metric_label(n)} |" for n in metric_names),
        metric_separator="---|" * len(metric_names),
        metrics_note=info.get("metrics_note"),
        sampling=info["sampling"],
        sampler=sampler_context(info),
        sample_grid=info.get("sample_grid"),
        sample_seed=info.get("sample_seed"),
        training_rows=training_rows,
        package_version=info["package_version"],
        diffusers_version=info["diffusers_version"],
        citation=CITATION,
    )


def _eval_results(info: dict) -> list[EvalResult] | None:
    """``model-index`` results: each variant's FID / Fréchet distance, the default weights first."""
    dataset = info.get("dataset") or {}
    results = []
    for v in info["variants"]:
        for name, value in v.get("metrics", {}).items():
            if name.lower() not in ("fid", "fd"):
                continue
            which = f"EMA std {v['std']:.3f}" if v["std"] is not None else "the exported weights"
            results.append(
                EvalResult(
                    task_type="unconditional-image-generation",
                    dataset_type=dataset.get("name") or "custom",
                    dataset_name=dataset.get("name") or "training data",
                    metric_type=name.lower(),
                    metric_value=float(value),
                    metric_name=f"{metric_label(name)} ({which})",
                    metric_config=v.get("variant"),
                )
            )
    return results or None


def card_data(info: dict) -> ModelCardData:
    """The YAML metadata of the card: license, tags, ``datasets``, ``base_model`` and ``model-index`` results.

    Args:
        info (`dict`): the export info.
    """
    conditional = info["model"]["config"].get("num_class_embeds") is not None
    architecture = info["model"]["config"]["architecture"]
    tags = ["edm2", "diffusers", "diffusion", "image-generation", f"edm2-config-{architecture}"]
    tags.append("class-conditional-image-generation" if conditional else "unconditional-image-generation")
    tags += [t for t in info.get("tags") or [] if t not in tags]
    dataset = info.get("dataset") or {}
    base_model = info.get("base_model")
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=info.get("license"),
        tags=tags,
        datasets=[dataset["name"]] if dataset.get("name") else None,
        base_model=base_model,
        base_model_relation="finetune" if base_model and info.get("run") else None,
        metrics=sorted({n.lower() for v in info["variants"] for n in v.get("metrics", {})} & {"fid", "fd"}) or None,
        model_name=info["model_name"],
        eval_results=_eval_results(info),
    )


def build_model_card(info: dict, repo_id: str | None = None, template: str | None = None) -> ModelCard:
    """Render the model card of an export.

    Args:
        info (`dict`): the export's ``export_info.json`` content.
        repo_id (`str`, *optional*): the Hub repository the usage snippets name; defaults to ``info["repo_id"]``.
        template (`str`, *optional*): template text; defaults to the packaged ``edm2_pipeline.md``.

    Returns:
        `huggingface_hub.ModelCard`.
    """
    repo_id = repo_id or info.get("repo_id")
    if not repo_id:
        raise ValueError("the model card needs a repository id (or a path) for its usage snippets")
    env = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    data = card_data(info)
    text = env.from_string(template or template_text()).render(card_data=data.to_yaml(), **card_context(info, repo_id))
    return ModelCard(text)


def card_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_export_info(export_dir: str | os.PathLike) -> dict:
    """Read ``export_info.json`` of an export folder.

    Args:
        export_dir (`str` or `os.PathLike`): the export's root folder.
    """
    path = Path(export_dir) / EXPORT_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not an EDM2 pipeline export: {EXPORT_INFO_NAME} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def write_model_card(export_dir: str | os.PathLike, info: dict, repo_id: str | None = None) -> Path:
    """Render the card into ``export_dir/README.md`` and record its hash in ``export_info.json``.

    The hash lets :func:`edm2_diffusers.hub.push_to_hub` re-render a card it generated (e.g. for another repository
    id) while never touching a card a person has edited.

    Args:
        export_dir (`str` or `os.PathLike`): the export's root folder.
        info (`dict`): its export info (updated in place with ``repo_id`` and ``card_sha256``).
        repo_id (`str`, *optional*): the repository id for the usage snippets.
    """
    text = str(build_model_card(info, repo_id))
    path = Path(export_dir) / "README.md"
    write_text_atomic(path, text)
    info["repo_id"] = repo_id or info.get("repo_id")
    info["card_sha256"] = card_sha256(text)
    write_json_atomic(Path(export_dir) / EXPORT_INFO_NAME, info)
    return path


__all__ = [
    "CITATION",
    "build_model_card",
    "card_context",
    "card_data",
    "read_export_info",
    "template_text",
    "write_model_card",
]
