"""Export post-hoc EMA variants as diffusers pipelines, write their model cards, push them to the Hub, load them."""

from .checks import check_export
from .export import ExportResult, default_stds, export_model, export_pipelines, export_run, variant_folder
from .loading import load_pipeline
from .model_card import EXPORT_INFO_NAME, build_model_card, read_export_info, template_text
from .push import check_push_access, push_to_hub, resolve_repo_id
from .remote_code import BundleError, bundle_module, write_custom_code

__all__ = [
    "EXPORT_INFO_NAME",
    "BundleError",
    "ExportResult",
    "build_model_card",
    "bundle_module",
    "check_export",
    "check_push_access",
    "default_stds",
    "export_model",
    "export_pipelines",
    "export_run",
    "load_pipeline",
    "push_to_hub",
    "read_export_info",
    "resolve_repo_id",
    "template_text",
    "variant_folder",
    "write_custom_code",
]
