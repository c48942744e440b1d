"""Upload an export to the Hugging Face Hub: one repository, one commit per export.

The commit adds every file of the export and deletes the repository's files the export no longer has (e.g. the
weight variant of a std that is not exported any more), so a repository always holds exactly one export.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .checks import check_export
from .layout import EXPORT_INFO_NAME
from .model_card import card_sha256, describe_ema, write_model_card

# Repository files a push never deletes (the Hub writes .gitattributes itself).
KEEP_IN_REPO = (".gitattributes",)

logger = logging.getLogger(__name__)


def resolve_repo_id(repo_id: str | None) -> str:
    """Check a Hub repository id (``user/name`` or ``name``) before anything is exported or sent.

    Args:
        repo_id (`str`, *optional*): the id given with ``--hub_model_id``.

    Raises:
        `ValueError`: when it is missing or not a valid repository id.
    """
    if repo_id is None or not str(repo_id).strip():
        raise ValueError(
            "pushing to the Hub needs a repository id: pass --hub_model_id USER/NAME (hub_model_id='USER/NAME')"
        )
    repo_id = str(repo_id).strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repository id (USER/NAME): {err}") from None
    if repo_id.count("/") > 1:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repository id (USER/NAME)")
    return repo_id


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Check, before any work is done, that ``token`` may push to ``repo_id``; return the full ``user/name`` id.

    The token must be valid (``whoami``). An existing repository must grant it write access (``auth_check`` with
    ``write=True``); a new one needs a token that may write (not a read token, a fine-grained token with
    ``repo.write`` on the namespace) and a namespace it may create repositories in (its own, or an organization where
    its role is above ``read``).

    Args:
        repo_id (`str`): ``user/name`` or ``name`` (in the token owner's namespace).
        token (`str`, *optional*): Hub token; default: ``HF_TOKEN`` or the cached ``hf auth login``.

    Raises:
        `ValueError`: no token, a rejected token, or no write access; the message says which.
    """
    repo_id = resolve_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        me = api.whoami()
    except LocalTokenNotFoundError:
        raise ValueError(
            "pushing to the Hub needs a token: pass --hub_token, set HF_TOKEN or run `hf auth login`"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(f"the Hub did not accept the token for pushing to {repo_id!r}: {err}") from None
    user = me.get("name")
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    try:
        api.auth_check(full_id, write=True)
        return full_id
    except GatedRepoError as err:
        raise ValueError(f"the Hub token of {user!r} has no write access to {full_id!r}: {err}") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if not isinstance(err, RepositoryNotFoundError) and status != 404:
            raise ValueError(f"the Hub token of {user!r} has no write access to {full_id!r}: {err}") from None
    # A new repository: may this token create it?
    namespace = full_id.split("/")[0]
    token_info = me.get("auth", {}).get("accessToken", {})
    role = token_info.get("role")
    if role == "read":
        raise ValueError(f"the Hub token of {user!r} is read-only; pushing to {full_id!r} needs a write token")
    if role == "fineGrained":
        scoped = token_info.get("fineGrained", {}).get("scoped", [])
        if not any(
            s.get("entity", {}).get("name") == namespace and "repo.write" in s.get("permissions", []) for s in scoped
        ):
            raise ValueError(f"the fine-grained Hub token of {user!r} may not create repositories in {namespace!r}")
    if namespace != user:
        org_roles = {org.get("name"): org.get("roleInOrg") for org in me.get("orgs", [])}
        if org_roles.get(namespace) in (None, "read"):
            raise ValueError(f"{user!r} may not create {full_id!r}: not a member of {namespace!r} with write access")
    return full_id


def default_commit_message(info: dict) -> str:
    """``Upload EDM2 Config G pipeline: EMA std 0.050 (default), 0.100 at step 1000`` from the export info."""
    arch = info["model"]["config"]["architecture"]
    if info.get("run") is None or info["variants"][0]["std"] is None and info.get("ema") is None:
        return f"Upload EDM2 Config {arch} pipeline"
    if info.get("ema") is not None:  # one model that is not a post-hoc EMA reconstruction
        return f"Upload EDM2 Config {arch} pipeline: {describe_ema(info['ema'])} at step {info['run']['step']}"
    stds = ", ".join(f"{v['std']:.3f}" + (" (default)" if i == 0 else "") for i, v in enumerate(info["variants"]))
    return f"Upload EDM2 Config {arch} pipeline: EMA std {stds} at step {info['run']['step']}"


def export_files(export_dir: str | os.PathLike) -> list[str]:
    """The files of an export, as repository paths (``/``-separated, sorted)."""
    export_dir = Path(export_dir)
    return sorted(p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file())


def _repo_files(api: HfApi, repo_id: str, revision: str | None) -> list[str]:
    """The files the repository holds now (none on a branch that does not exist yet)."""
    try:
        return api.list_repo_files(repo_id, revision=revision, repo_type="model")
    except RevisionNotFoundError:
        return []


def push_to_hub(
    export_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    update_card: bool = True,
):
    """Create (or reuse) a model repository and upload an export to it in a single commit.

    The export is checked first (safetensors weights only, complete pipelines). The repository is created with
    ``HfApi.create_repo(exist_ok=True)``; all files go in one ``HfApi.create_commit``, so the repository never shows
    half an export, and the same commit deletes what an earlier export left that this one does not have.
    (``upload_folder`` is not used: with ``hf_xet`` installed it may split a folder into several
    commits.) If the card was generated by the export and not edited since, it is rendered again with the final
    repository id, so that its usage snippets name this repository.

    Args:
        export_dir (`str` or `os.PathLike`): a folder written by :func:`edm2_diffusers.hub.export_pipelines`.
        repo_id (`str`): ``user/name`` (or ``name``, in the token owner's namespace).
        private (`bool`): create the repository private (an existing repository keeps its visibility).
        token (`str`, *optional*): Hub token; default: ``HF_TOKEN`` or the cached ``hf auth login``.
        commit_message (`str`, *optional*): default: names the architecture, the EMA stds and the step.
        revision (`str`, *optional*): branch to commit to (default: ``main``).
        update_card (`bool`): re-render an unedited generated card with the final repository id.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"export folder {export_dir} does not exist")
    repo_id = resolve_repo_id(repo_id)
    check_export(export_dir)
    info_path = export_dir / EXPORT_INFO_NAME
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    if not (export_dir / "README.md").is_file():
        raise ValueError(f"{export_dir} has no model card (README.md); export it with export_pipelines")

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    full_id = getattr(url, "repo_id", None) or repo_id

    if info is not None and update_card and info.get("repo_id") != full_id:
        readme = (export_dir / "README.md").read_text(encoding="utf-8")
        if card_sha256(readme) == info.get("card_sha256"):
            write_model_card(export_dir, info, full_id)
        else:
            logger.warning("README.md of %s was edited after export; leaving it as it is", export_dir)

    files = export_files(export_dir)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(export_dir / rel)) for rel in files]
    stale = sorted(set(_repo_files(api, full_id, revision)) - set(files) - set(KEEP_IN_REPO))
    operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
    if commit_message is None:
        commit_message = default_commit_message(info) if info else f"Upload EDM2 pipeline export {export_dir.name}"
    commit = api.create_commit(
        repo_id=full_id,
        operations=operations,
        commit_message=commit_message,
        repo_type="model",
        revision=revision,
    )
    logger.info("pushed %d files of %s to %s, deleted %d stale ones", len(files), export_dir, full_id, len(stale))
    return commit


__all__ = ["check_push_access", "default_commit_message", "export_files", "push_to_hub", "resolve_repo_id"]
