"""Export training runs and converted checkpoints as diffusers pipelines (EMA stds as weight variants), write their
model cards, push them to the Hub, load them with the package's classes.

Modules by job: ``layout`` (the export's files and variant names), ``run_info`` (what an export reads from a run),
``writing`` (writing an export), ``sampler_choice`` (the default sampler: Heun or the EMA sweep's choice),
``export`` (the public export functions and the export-then-push helper), ``converted`` (NVIDIA's pickles through
the same exporter), ``checks`` (what an export may hold), ``model_card``, ``remote_code`` (the bundled custom code),
``push``, ``loading`` and ``pipeline_io`` (``EDM2Pipeline.from_pretrained`` / ``save_pretrained`` / ``push_to_hub``).
"""

from .checks import check_export
from .converted import export_converted
from .export import export_model, export_pipelines, export_run
from .layout import EXPORT_INFO_NAME, variant_name
from .loading import load_pipeline
from .model_card import build_model_card, read_export_info, template_text
from .push import check_push_access, push_to_hub, resolve_repo_id
from .remote_code import BundleError, bundle_module, write_custom_code
from .run_info import default_stds
from .writing import ExportOptions, ExportResult, ExportSource, Variant, write_export

__all__ = [
    "EXPORT_INFO_NAME",
    "BundleError",
    "ExportOptions",
    "ExportResult",
    "ExportSource",
    "Variant",
    "build_model_card",
    "bundle_module",
    "check_export",
    "check_push_access",
    "default_stds",
    "export_converted",
    "export_model",
    "export_pipelines",
    "export_run",
    "load_pipeline",
    "push_to_hub",
    "read_export_info",
    "resolve_repo_id",
    "template_text",
    "variant_name",
    "write_custom_code",
    "write_export",
]
