"""The Hub token and write access are checked before training when ``--push_to_hub`` is given (only the Hub's HTTP
transport is faked: huggingface_hub's whoami and auth_check run), and every script spells the private-repo flag as
diffusers does (``--hub_private_repo``; older spellings stay aliases)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hub_http import hub_transport, whoami
from test_training_export import load_script, tiny_config

from edm2_diffusers.hub import check_push_access
from edm2_diffusers.training import default_config, merge_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_http():
    with hub_transport() as server:
        yield server


def test_a_write_token_may_push_to_its_namespace_and_to_repositories_it_writes(hub_http):
    hub_http.tokens["hf_alice"] = whoami("alice", orgs={"lab": "write"})
    hub_http.repos["alice/old"] = {"alice"}
    assert check_push_access("alice/new", "hf_alice") == "alice/new"
    assert check_push_access("new", "hf_alice") == "alice/new"  # a bare name lives in the token owner's namespace
    assert check_push_access("alice/old", "hf_alice") == "alice/old"
    assert check_push_access("lab/new", "hf_alice") == "lab/new"
    assert "GET /api/whoami-v2" in hub_http.requests
    assert "GET /api/models/alice/old/auth-check/write" in hub_http.requests


@pytest.mark.parametrize(
    "token, repo, match",
    [
        ("hf_wrong", "alice/new", "did not accept the token"),
        ("hf_alice", "bob/model", "no write access to 'bob/model'"),  # exists, alice only reads it
        ("hf_read", "alice/new", "read-only"),
        ("hf_alice", "lab/new", "not a member of 'lab' with write access"),  # alice only reads in lab
        ("hf_alice", "carol/new", "not a member of 'carol'"),  # another user's namespace
    ],
)
def test_no_push_access_is_a_clear_error(hub_http, token, repo, match):
    hub_http.tokens["hf_alice"] = whoami("alice", orgs={"lab": "read"})
    hub_http.tokens["hf_read"] = whoami("alice", role="read")
    hub_http.repos["bob/model"] = {"bob"}
    with pytest.raises(ValueError, match=match):
        check_push_access(repo, token)


def test_a_fine_grained_token_needs_repo_write_on_the_namespace(hub_http):
    scoped = {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read"]}
    me = whoami("alice", role="fineGrained")
    me["auth"]["accessToken"]["fineGrained"] = {"scoped": [scoped]}
    hub_http.tokens["hf_fg"] = me
    with pytest.raises(ValueError, match="fine-grained"):
        check_push_access("alice/new", "hf_fg")
    scoped["permissions"].append("repo.write")
    assert check_push_access("alice/new", "hf_fg") == "alice/new"


@pytest.mark.parametrize(
    "token, repo, match",
    [("hf_wrong", "alice/tiny", "did not accept the token"), ("hf_alice", "bob/model", "no write access")],
)
def test_training_stops_before_writing_anything_without_push_access(tmp_path, hub_http, capsys, token, repo, match):
    hub_http.tokens["hf_alice"] = whoami("alice")
    hub_http.repos["bob/model"] = {"bob"}
    out = tmp_path / "run"
    argv = ["--config", str(tiny_config(tmp_path)), "--output_dir", str(out), "--num_metric_images", "0"]
    argv += ["--push_to_hub", "--hub_model_id", repo, "--hub_token", token]
    assert load_script().main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and "before training" in err
    assert not out.exists()  # the output folder was never created


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag", ["--hub_private_repo", "--hub_private", "--private"])
def test_every_script_takes_the_private_repo_flag_and_its_old_spellings(flag):
    train = _load("train_edm2").parse_args(["--output_dir", "x", flag])
    assert train.hub_private_repo is True
    assert _load("train_edm2").parse_args(["--output_dir", "x"]).hub_private_repo is None  # the config decides
    export_args = ["--run_dir", "r", "--stds", "0.1", "--output_dir", "o"]
    assert _load("export_pipeline").parse_args([*export_args, flag]).hub_private_repo is True
    assert _load("export_pipeline").parse_args(export_args).hub_private_repo is False


def test_the_old_yaml_key_hub_private_still_reads():
    cfg = merge_config(default_config(), {"training": {"hub_private": True}})
    assert cfg["training"]["hub_private_repo"] is True and "hub_private" not in cfg["training"]
