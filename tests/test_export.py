"""Export of post-hoc EMA variants as diffusers pipelines: layout, remote code, model card, Hub push, bad input.

The run folder comes from a real short digits training run (tiny Config G U-Net, power-function EMA snapshots, the
trainer's config.yaml); loading is checked in fresh subprocesses with and without the package importable. The only
fake is the Hub's network boundary (``HfApi.create_repo`` / ``HfApi.create_commit`` and ``snapshot_download``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_unet_config
from huggingface_hub import CommitInfo, CommitOperationDelete, HfApi, ModelCard, RepoUrl
from safetensors.torch import load_file

import edm2_diffusers
from edm2_diffusers import EDM2Pipeline, EDM2UNet2DModel
from edm2_diffusers.ema import reconstruct
from edm2_diffusers.hub import (
    BundleError,
    build_model_card,
    bundle_module,
    check_export,
    export_pipelines,
    export_run,
    load_pipeline,
    push_to_hub,
    read_export_info,
    template_text,
    variant_name,
)
from edm2_diffusers.hub.model_card import card_sha256
from edm2_diffusers.hub.push import export_files
from edm2_diffusers.training import load_config, train

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 2  # sampler steps used by the tests (3 network evaluations)


def train_run(run_dir: Path, **model_overrides) -> Path:
    """A short digits training run of a tiny Config G U-Net with the power-function EMA (snapshots at steps 3, 6)."""
    model = tiny_unet_config(**model_overrides)
    cfg = {
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()},
        "data": {"source": "sklearn_digits", "max_train_samples": 64},
        "training": {
            "train_batch_size": 16,
            "max_train_steps": 6,
            "checkpointing_steps": 0,
            "sample_every_steps": 0,
            "report_to": "none",
            "seed": 0,
            "export_pipeline": False,  # these tests export the run themselves
        },
        "ema": {"type": "power", "stds": [0.05, 0.10], "snapshot_every_steps": 3},
        "sampling": {"num_inference_steps": STEPS, "grid_rows": 2, "grid_cols": 3, "seed": 5},
    }
    if model.get("num_class_embeds"):
        cfg["data"]["label_column"] = "label"
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path, {"training.output_dir": str(run_dir)}))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("digits") / "run")


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "digits-edm2"
    export_pipelines(run_dir, [0.05, 0.10], out, license="mit", repo_id="someone/digits-edm2")
    return out


def all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in all_files(folder)}


# ----------------------------------------------------------------------------------------------------------------
# Layout and weights.


PIPELINE_FILES = {
    "model_index.json",
    "pipeline_edm2.py",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/unet_edm2.py",
    "scheduler/scheduler_config.json",
    "scheduler/scheduling_edm_heun.py",
}
VARIANT_FILES = {f"unet/diffusion_pytorch_model.{v}.safetensors" for v in ("ema0050", "ema0100")}


def test_export_is_one_pipeline_with_weight_variants(export_dir):
    expected = PIPELINE_FILES | VARIANT_FILES | {"README.md", "samples.png", "export_info.json"}
    assert all_files(export_dir) == expected
    assert check_export(export_dir) == [export_dir]
    index = json.loads((export_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_edm2", "EDM2Pipeline"]
    assert index["unet"] == ["unet_edm2", "EDM2UNet2DModel"]
    assert index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
    assert "_ignore_files" not in index
    assert index["default_num_inference_steps"] == STEPS  # the run's sampler steps, a call's default


def test_exported_weights_are_the_posthoc_reconstructions(run_dir, export_dir):
    rec = reconstruct(str(run_dir), [0.05, 0.10])
    unet = export_dir / "unet"
    default = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    by_variant = {v: load_file(str(unet / f"diffusion_pytorch_model.{v}.safetensors")) for v in ("ema0050", "ema0100")}
    for saved, state in ((default, rec.state_dicts[0]), (by_variant["ema0050"], rec.state_dicts[0])):
        assert saved.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(saved[k], state[k].to(saved[k].dtype), rtol=0, atol=0)
    for k in rec.state_dicts[1]:
        torch.testing.assert_close(by_variant["ema0100"][k], rec.state_dicts[1][k], rtol=0, atol=0)
    assert any(not torch.equal(default[k], by_variant["ema0100"][k]) for k in default), "EMA lengths must differ"


@pytest.mark.parametrize(
    "std, name", [(0.05, "ema0050"), (0.1, "ema0100"), (0.015, "ema0015"), (0.2, "ema0200"), (0.0504, "ema0050")]
)
def test_variant_names_are_fixed_width_without_dots(std, name):
    assert variant_name(std) == name


def test_stds_sharing_a_variant_name_are_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="share the variant name ema0050"):
        export_pipelines(run_dir, [0.05, 0.0501], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scheduler_carries_the_run_sampling_settings(export_dir):
    cfg = json.loads((export_dir / "scheduler/scheduler_config.json").read_text())
    assert cfg["_class_name"] == "EDMHeunScheduler"
    assert (cfg["sigma_min"], cfg["sigma_max"], cfg["rho"], cfg["sigma_data"]) == (0.002, 80.0, 7.0, 0.5)
    info = read_export_info(export_dir)
    assert info["sampling"]["num_inference_steps"] == STEPS
    assert [(v["std"], v["variant"]) for v in info["variants"]] == [(0.05, "ema0050"), (0.10, "ema0100")]


def test_custom_code_is_generated_from_the_package_sources(export_dir):
    for rel, module in (
        ("unet/unet_edm2.py", "edm2_diffusers.models.unet_edm2"),
        ("scheduler/scheduling_edm_heun.py", "edm2_diffusers.schedulers.scheduling_edm_heun"),
        ("pipeline_edm2.py", "edm2_diffusers.pipelines.pipeline_edm2"),
    ):
        code = (export_dir / rel).read_text()
        # Same body as a fresh bundle of the installed modules (the header names the bundled modules).
        fresh = bundle_module(module)
        assert code.endswith(fresh.split("\n", 1)[1]), f"{rel} differs from the package's {module}"
        assert not re.search(r"^\s*(from|import)\s+(edm2_diffusers|\.)", code, re.M), f"{rel} imports the package"
    unet_code = (export_dir / "unet/unet_edm2.py").read_text()
    assert "# From edm2_diffusers.models.layers" in unet_code and "class EDM2UNet2DModel" in unet_code


# ----------------------------------------------------------------------------------------------------------------
# Loading in fresh processes, with and without the package.

RUNNER = r"""
import json, pathlib, shutil, sys, types

spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
if not spec["block"]:
    sys.path.insert(0, spec["package_root"])  # the package under test, not another installed copy
if spec["block"]:
    sys.modules["edm2_diffusers"] = None  # any `import edm2_diffusers[...]` now raises ImportError
    try:
        import edm2_diffusers  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("edm2_diffusers is still importable")

import numpy as np
import torch
import huggingface_hub
import diffusers.configuration_utils as configuration_utils
import diffusers.pipelines.pipeline_utils as pipeline_utils
import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils
import diffusers.utils.hub_utils as hub_utils
from diffusers import DiffusionPipeline
from huggingface_hub.utils import filter_repo_objects


class FakeHub:
    # The Hub's network boundary: one repository served from the local export into a local cache snapshot.

    def __init__(self, repo_id, root, cache):
        self.repo_id, self.root = repo_id, pathlib.Path(root)
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        self.snapshot = pathlib.Path(cache) / "snapshots" / ("0" * 40)
        self.downloaded = []

    def _fetch(self, repo_id, rel):
        assert repo_id == self.repo_id, repo_id
        if rel not in self.files:
            raise FileNotFoundError(f"{rel} is not in {repo_id}")
        dst = self.snapshot / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.root / rel, dst)
        self.downloaded.append(rel)
        return str(dst)

    def model_info(self, repo_id, **kwargs):
        assert repo_id == self.repo_id, repo_id
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in self.files], sha="0" * 40)

    def hf_hub_download(self, repo_id, filename, subfolder=None, **kwargs):
        return self._fetch(repo_id, f"{subfolder}/{filename}" if subfolder else filename)

    def snapshot_download(self, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        for rel in filter_repo_objects(self.files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            self._fetch(repo_id, rel)
        return str(self.snapshot)


hub = FakeHub(spec["repo_id"], spec["export"], pathlib.Path(spec["tmp"]) / "hub-cache")
for module in (huggingface_hub, pipeline_utils, dynamic_modules_utils, configuration_utils, hub_utils):
    for name in ("model_info", "hf_hub_download", "snapshot_download"):
        if hasattr(module, name):
            setattr(module, name, getattr(hub, name))

report = {"snippets": {}, "variants": {}}
arrays = {}
for name, code in spec["snippets"].items():
    hub.downloaded = []
    scope = {}
    exec(compile(code, f"<card snippet {name}>", "exec"), scope)
    report["snippets"][name] = [type(scope["pipe"]).__name__, len(scope["images"]), type(scope["images"][0]).__name__]
    report["snippets"][name + ":downloaded"] = sorted(set(hub.downloaded))


def sample(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, num_inference_steps=spec["steps"], generator=gen, output_type="np").images


def downloads(load):
    hub.downloaded = []
    pipe = load()
    return pipe, sorted(set(hub.downloaded))


for variant in spec["variants"]:
    key = variant or "default"
    pipe = DiffusionPipeline.from_pretrained(spec["export"], variant=variant, trust_remote_code=True)
    report["variants"][key] = [type(pipe).__name__, type(pipe).__module__, type(pipe.unet).__module__]
    arrays[key] = sample(pipe)
    # From the (faked) Hub repository: only this variant's U-Net weights are fetched.
    pipe, report["hub_downloaded:" + key] = downloads(
        lambda: DiffusionPipeline.from_pretrained(spec["repo_id"], variant=variant, trust_remote_code=True)
    )
    arrays["hub:" + key] = sample(pipe)
    if not spec["block"]:
        import edm2_diffusers
        from edm2_diffusers import EDM2Pipeline

        assert edm2_diffusers.__file__.startswith(spec["package_root"]), edm2_diffusers.__file__
        from edm2_diffusers.hub import load_pipeline

        pkg = EDM2Pipeline.from_pretrained(spec["export"], variant=variant)
        assert type(pkg) is EDM2Pipeline and type(pkg.unet) is edm2_diffusers.EDM2UNet2DModel
        arrays["package:" + key] = sample(pkg)
        pkg, report["hub_package_downloaded:" + key] = downloads(
            lambda: EDM2Pipeline.from_pretrained(spec["repo_id"], variant=variant, torch_dtype=torch.float32)
        )
        arrays["hub-package:" + key] = sample(pkg)
        arrays["load_pipeline:" + key] = sample(load_pipeline(spec["repo_id"], variant=variant, dtype=torch.float32))
        try:
            DiffusionPipeline.from_pretrained(spec["export"], variant=variant)
        except ValueError as err:
            report["without_trust"] = str(err)
if spec["block"]:
    # Without the package, the remote-code pipeline saves its own standalone code: the folder loads again.
    resaved = pathlib.Path(spec["tmp"]) / "resaved"
    pipe.save_pretrained(resaved)
    report["resaved_files"] = sorted(p.relative_to(resaved).as_posix() for p in resaved.rglob("*") if p.is_file())
    arrays["resaved"] = sample(DiffusionPipeline.from_pretrained(str(resaved), trust_remote_code=True))
np.savez(spec["arrays"], **arrays)
pathlib.Path(spec["report"]).write_text(json.dumps(report))
"""


def card_snippets(readme: str) -> dict[str, str]:
    """The ```python blocks of a card whose first line is '# usage: NAME'."""
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    out = {}
    for block in blocks:
        first, _, _ = block.partition("\n")
        if first.startswith("# usage:"):
            out[first.split(":", 1)[1].strip()] = block
    return out


def run_loader(export_dir: Path, tmp: Path, block: bool, snippets: dict[str, str], variants=(None, "ema0100")):
    tmp.mkdir()
    spec = {
        "block": block,
        "package_root": str(Path(edm2_diffusers.__file__).resolve().parents[1]),
        "export": str(export_dir),
        "repo_id": read_export_info(export_dir)["repo_id"],
        "tmp": str(tmp),
        "variants": list(variants),
        "steps": STEPS,
        "snippets": snippets,
        "arrays": str(tmp / "arrays.npz"),
        "report": str(tmp / "report.json"),
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "runner.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(
        HF_HOME=str(tmp / "hf_home"),
        HF_MODULES_CACHE=str(tmp / "hf_modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    # -I: no current folder, PYTHONPATH or user site on sys.path; the runner also blocks the package when asked.
    cmd = [sys.executable, "-I", str(tmp / "runner.py"), str(tmp / "spec.json")]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp / "report.json").read_text())
    with np.load(tmp / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return report, arrays


@pytest.fixture(scope="module")
def reference_images(export_dir):
    """Samples of the default weights and of a variant from the package's classes in this process."""
    out = {}
    for variant in (None, "ema0050", "ema0100"):
        pipe = load_pipeline(export_dir, variant=variant)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(0)
        out[variant or "default"] = pipe(
            batch_size=2, num_inference_steps=STEPS, generator=gen, output_type="np"
        ).images
    np.testing.assert_array_equal(out["default"], out["ema0050"])
    assert not np.allclose(out["default"], out["ema0100"])
    return out


CODE_FILES = {"pipeline_edm2.py", "unet/unet_edm2.py", "scheduler/scheduling_edm_heun.py"}
CONFIG_FILES = {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"}


def expected_downloads(variant: str | None, code: bool) -> list[str]:
    weights = "unet/diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    return sorted(CONFIG_FILES | {weights} | (CODE_FILES if code else set()))


def test_every_variant_loads_and_samples_without_the_package(export_dir, reference_images, tmp_path):
    snippets = card_snippets((export_dir / "README.md").read_text())
    # The card's snippets as written, against the (faked) Hub repository they name.
    hub_snippets = {k: snippets[k] for k in ("root", "variant")}
    report, arrays = run_loader(export_dir, tmp_path / "blocked", block=True, snippets=hub_snippets)
    for key in ("default", "ema0100"):
        name, module, unet_module = report["variants"][key]
        assert name == "EDM2Pipeline" and module.startswith("diffusers_modules.")
        assert unet_module.startswith("diffusers_modules.")
        np.testing.assert_allclose(arrays[key], reference_images[key], rtol=0, atol=1e-6)
        np.testing.assert_allclose(arrays["hub:" + key], reference_images[key], rtol=0, atol=1e-6)
    # From the Hub each load fetches the code, the configs and exactly one U-Net weights file (the snippets run
    # first, on an empty cache; the later loads of the same files find them cached).
    assert report["snippets"]["root:downloaded"] == expected_downloads(None, code=True)
    assert report["snippets"]["variant:downloaded"] == expected_downloads("ema0100", code=True)
    for key in ("default", "ema0100"):
        assert set(report["hub_downloaded:" + key]) <= set(expected_downloads(None if key == "default" else key, True))
    assert report["snippets"]["root"] == ["EDM2Pipeline", 4, "Image"]
    assert report["snippets"]["variant"] == ["EDM2Pipeline", 4, "Image"]
    assert (tmp_path / "blocked" / "edm2_sample.png").is_file()
    assert set(report["resaved_files"]) == PIPELINE_FILES
    np.testing.assert_allclose(arrays["resaved"], reference_images["ema0100"], rtol=0, atol=1e-6)


def test_every_variant_loads_and_samples_with_the_package(export_dir, reference_images, tmp_path):
    readme = (export_dir / "README.md").read_text()
    repo_id = read_export_info(export_dir)["repo_id"]
    snippets = card_snippets(readme)
    assert set(snippets) == {"root", "variant", "package"}
    assert 'EDM2Pipeline.from_pretrained("someone/digits-edm2", variant="ema0100")' in snippets["package"]
    # The package snippet first, on an empty cache: no code file is fetched, only that variant's weights.
    runnable = {"package": snippets["package"], "root": snippets["root"].replace(repo_id, str(export_dir))}
    report, arrays = run_loader(export_dir, tmp_path / "installed", block=False, snippets=runnable)
    assert report["snippets"]["package"] == ["EDM2Pipeline", 4, "Image"]
    assert report["snippets"]["package:downloaded"] == expected_downloads("ema0100", code=False)
    for key in ("default", "ema0100"):
        assert report["variants"][key][0] == "EDM2Pipeline"
        for prefix in ("", "package:", "hub-package:", "load_pipeline:"):
            np.testing.assert_allclose(arrays[prefix + key], reference_images[key], rtol=0, atol=1e-6)
    assert report["hub_package_downloaded:default"] == expected_downloads(None, code=False)
    assert "trust_remote_code" in report["without_trust"]


def test_subfolder_is_never_ignored(export_dir):
    with pytest.raises(FileNotFoundError, match="pass variant="):
        load_pipeline(export_dir, subfolder="ema-0.100")
    with pytest.raises(FileNotFoundError, match="pass variant="):
        EDM2Pipeline.from_pretrained(export_dir, subfolder="ema-0.100")
    with pytest.raises(ValueError, match=r"no weight variant 'ema0150' \(its variants: ema0050, ema0100\)"):
        EDM2Pipeline.from_pretrained(export_dir, variant="ema0150")
    with pytest.raises(ValueError, match="disagree"):
        load_pipeline(export_dir, torch_dtype=torch.float16, dtype=torch.float32)
    pipe = load_pipeline(export_dir, variant="ema0100", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------------
# EDM2Pipeline.save_pretrained / push_to_hub round trips.


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_saved(folder: Path, pipe, reference, tmp: Path) -> None:
    """``folder`` is an export: bundled code, card, info; both loaders give ``pipe``'s weights and samples."""
    assert PIPELINE_FILES | {"README.md", "export_info.json"} == all_files(folder)
    check_export(folder)
    info = read_export_info(folder)
    assert info["variants"] == [{"std": None, "variant": None, "metrics": {}}]
    assert ModelCard.load(folder / "README.md").data.library_name == "diffusers"
    again = EDM2Pipeline.from_pretrained(folder)
    assert type(again) is EDM2Pipeline and same_weights(again.unet, pipe.unet)
    report, arrays = run_loader(folder, tmp, block=True, snippets={}, variants=[None])
    assert report["variants"]["default"][1].startswith("diffusers_modules.")
    np.testing.assert_allclose(arrays["default"], reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["resaved"], reference, rtol=0, atol=1e-6)


def test_save_pretrained_round_trip_of_a_trained_pipeline(export_dir, reference_images, tmp_path):
    pipe = EDM2Pipeline.from_pretrained(export_dir, variant="ema0100")
    pipe.save_pretrained(tmp_path / "saved")
    check_saved(tmp_path / "saved", pipe, reference_images["ema0100"], tmp_path / "load")
    info = read_export_info(tmp_path / "saved")
    assert info["run"] == read_export_info(export_dir)["run"] and info["origin"] == {"name_or_path": str(export_dir)}
    for rel in CODE_FILES:
        assert (tmp_path / "saved" / rel).read_text() == (export_dir / rel).read_text()


def test_save_pretrained_round_trip_of_a_remote_code_pipeline(export_dir, reference_images, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(export_dir, variant="ema0100", trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules.") and not isinstance(pipe, EDM2Pipeline)
    pipe.save_pretrained(tmp_path / "saved")
    check_saved(tmp_path / "saved", pipe, reference_images["ema0100"], tmp_path / "load")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_edm2", "EDM2Pipeline"] and index["unet"] == [
        "unet_edm2",
        "EDM2UNet2DModel",
    ]
    for rel in CODE_FILES:  # the code it was loaded from, copied as it is
        assert (tmp_path / "saved" / rel).read_text() == (export_dir / rel).read_text()


def test_pipeline_push_to_hub_writes_the_export_layout(export_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    pipe = EDM2Pipeline.from_pretrained(export_dir, variant="ema0100")
    pipe.push_to_hub("alice/pushed", private=True)
    (sent,) = hub.commits
    assert set(sent["files"]) == PIPELINE_FILES | {"README.md", "export_info.json"}
    assert hub.repos[0]["private"] is True
    card = ModelCard(sent["files"]["README.md"].decode())
    assert 'EDM2Pipeline.from_pretrained("alice/pushed")' in card.text
    weights = sent["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert weights == (export_dir / "unet/diffusion_pytorch_model.ema0100.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Model card.


def test_model_card_metadata_and_content(run_dir, export_dir):
    card = ModelCard.load(export_dir / "README.md")
    data = card.data
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "mit"
    assert {"edm2", "diffusers", "edm2-config-G", "unconditional-image-generation"} <= set(data.tags)
    text = card.text
    unet = EDM2UNet2DModel.from_pretrained(export_dir / "unet")
    n_params = sum(p.numel() for p in unet.parameters())
    rec = reconstruct(str(run_dir), [0.05])
    assert f"| parameters | {n_params:,} " in text
    assert f"| training images seen | {rec.nimg:,} |" in text and f"| optimizer steps | {rec.step:,} |" in text
    assert "EDM2 Config G" in text
    assert "| 0.050 | `ema0050` (default) |" in text and "| 0.100 | `ema0100` |" in text
    assert f"| steps N (`num_inference_steps`) | {STEPS} ({2 * STEPS - 1} network evaluations) |" in text
    assert "![Samples of the default weights](samples.png)" in text
    assert "Analyzing and Improving the Training Dynamics of Diffusion Models" in text and "CVPR" in text
    assert "scikit-learn digits" in text
    assert '"someone/digits-edm2"' in text


def test_card_metadata_of_a_fine_tune_on_a_hub_dataset(export_dir):
    info = read_export_info(export_dir)
    info["base_model"] = "alice/edm2-digits-base"
    info["dataset"] = {"name": "alice/digits", "text": "[alice/digits](https://huggingface.co/datasets/alice/digits)"}
    info["variants"][1]["metrics"] = {"fid": 7.25}
    card = ModelCard(str(build_model_card(info)))
    assert card.data.base_model == "alice/edm2-digits-base" and card.data.base_model_relation == "finetune"
    assert card.data.datasets == ["alice/digits"] and card.data.metrics == ["fid"]
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("alice/digits", "fid", 7.25)
    assert result.metric_config == "ema0100" and "fine-tuned from [`alice/edm2-digits-base`]" in card.text
    plain = ModelCard(str(build_model_card(read_export_info(export_dir))))
    assert plain.data.base_model is None and plain.data.datasets is None and plain.data.eval_results is None


def test_sample_grid_shape(export_dir):
    from PIL import Image

    with Image.open(export_dir / "samples.png") as img:
        # 2 x 3 tiles of 8 x 8 pixels, upscaled 8x to 64-pixel tiles with 2-pixel gaps (the training grids'
        # renderer), grayscale for a 1-channel model.
        assert img.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2) and img.mode == "L"


class ToyFeatures(torch.nn.Module):
    """A fixed random projection of 8x8 images to 4 features (the sweep's feature-extractor convention)."""

    name = "toy"
    num_features = 4

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return images.flatten(1).float() @ self.w


def test_stds_best_reads_the_real_ema_sweep(run_dir, tmp_path):
    from edm2_diffusers.evaluation.fid import FeatureStats
    from edm2_diffusers.evaluation.sweep import sweep_ema

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    reference = FeatureStats.from_features(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), "toy")
    sweep = sweep_ema(
        str(run),
        [0.05, 0.12],
        ToyFeatures(),
        reference,
        num_images=8,
        num_inference_steps=STEPS,
        batch_size=8,
        output_dir=str(run / "sweep"),
        progress=False,
    )
    other = 0.12 if sweep.best_std == 0.05 else 0.05
    result = export_pipelines(run, f"best,{other}", tmp_path / "out", sample_grid=False)
    assert [s for s, _ in result.variants] == [sweep.best_std, other]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.metrics == ["fd"]
    assert "| EMA std σ_rel | variant | FD |" in card.text
    for row in sweep.rows:
        name = f"`{variant_name(row['std'])}`" + (" (default)" if row["std"] == sweep.best_std else "")
        assert f"| {row['std']:.3f} | {name} | {row['fd']:.4g} |" in card.text
    # The model-index results: each variant's digits Fréchet distance, read back by huggingface_hub.
    results = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert results == {("fd", variant_name(row["std"])): row["fd"] for row in sweep.rows}
    assert {r.task_type for r in card.data.eval_results} == {"unconditional-image-generation"}
    assert "8 generated images" in card.text and "toy features" in card.text


def test_sweep_metrics_only_for_the_step_they_were_measured_at(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    best = {
        "std": 0.08,
        "metric": "fid",
        "value": 12.5,
        "step": 6,
        "results": [{"std": 0.05, "fid": 14.0, "confident": 0.9}, {"std": 0.08, "fid": 12.5, "confident": 0.95}],
        "settings": {"num_images": 50000, "num_inference_steps": 32, "feature_extractor": "inception"},
    }
    (sweep / "best.json").write_text(json.dumps(best))
    out = tmp_path / "out"
    result = export_pipelines(run_dir, "best,0.05", out, sweep_dir=sweep, sample_grid=False)
    assert [s for s, _ in result.variants] == [0.08, 0.05]
    card = ModelCard.load(out / "README.md")
    assert card.data.metrics == ["fid"]
    assert "| EMA std σ_rel | variant | FID | confident share |" in card.text
    assert "| 0.080 | `ema0080` (default) | 12.5 | 0.95 |" in card.text
    assert "| 0.050 | `ema0050` | 14 | 0.9 |" in card.text
    fid = [(r.metric_config, r.metric_value, r.metric_name) for r in card.data.eval_results]
    assert fid == [("ema0080", 12.5, "FID (EMA std 0.080)"), ("ema0050", 14.0, "FID (EMA std 0.050)")]
    assert "50,000 generated images, 32 sampler steps, inception features" in card.text
    assert not (out / "samples.png").exists() and "samples.png" not in card.text

    export_pipelines(run_dir, "best", tmp_path / "at3", step=3, sweep_dir=sweep / "best.json", sample_grid=False)
    card = ModelCard.load(tmp_path / "at3" / "README.md")
    assert card.data.metrics is None and "FID" not in card.text and "| 0.080 | `ema0080` (default) |" in card.text
    assert card.data.eval_results is None


def test_template_is_package_data_and_model_cards_example_is_current(tmp_path):
    packaged = REPO_ROOT / "edm2_diffusers" / "hub" / "templates" / "edm2_pipeline.md"
    assert template_text() == packaged.read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'edm2_diffusers = \[[^\]]*"hub/templates/\*\.md"', pyproject)
    # One source of truth: model_cards/ holds no copy or link of the template, only the rendered example.
    assert sorted(p.name for p in (REPO_ROOT / "model_cards").iterdir()) == ["README.md", "example"]
    example = REPO_ROOT / "model_cards" / "example"
    info = json.loads((example / "export_info.json").read_text())
    assert build_model_card(info).content == (example / "README.md").read_text(), (
        "model_cards/example/README.md is stale: render it again (see model_cards/README.md)"
    )
    assert info["card_sha256"] == card_sha256((example / "README.md").read_text())
    assert [v["variant"] for v in info["variants"]] == ["ema0050", "ema0100"]
    assert ModelCard.load(example / "README.md").data.library_name == "diffusers"


# ----------------------------------------------------------------------------------------------------------------
# Push to the Hub (network boundary faked).


class FakeHub:
    """Records what HfApi would send and keeps each repository's files; create_repo resolves a bare name into the
    token owner's namespace, and a new repository holds the .gitattributes the Hub writes."""

    def __init__(self, monkeypatch):
        self.repos, self.commits, self.files = [], [], {}
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
            hub.repos.append(dict(repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type))
            full = repo_id if "/" in repo_id else f"token-owner/{repo_id}"
            hub.files.setdefault(full, {".gitattributes": b"*.safetensors filter=lfs\n"})
            return RepoUrl(f"https://huggingface.co/{full}")

        def list_repo_files(api, repo_id, *, revision=None, repo_type=None, **kwargs):
            return sorted(hub.files[repo_id])

        def create_commit(api, repo_id, operations, *, commit_message, repo_type=None, revision=None, **kwargs):
            files, deleted = {}, []
            for op in operations:
                if isinstance(op, CommitOperationDelete):
                    deleted.append(op.path_in_repo)
                    continue
                src = op.path_or_fileobj
                files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
            repo = hub.files[repo_id]
            for rel in deleted:
                del repo[rel]  # a delete of a file the repository does not hold would fail on the Hub
            repo.update(files)
            hub.commits.append(
                dict(repo_id=repo_id, message=commit_message, files=files, deleted=deleted, repo_type=repo_type)
            )
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description="",
                oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_push_sends_the_export_in_one_commit(export_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    local = tmp_path / "copy"
    shutil.copytree(export_dir, local)
    commit = push_to_hub(local, "alice/edm2-digits", private=True)
    assert hub.repos == [dict(repo_id="alice/edm2-digits", private=True, exist_ok=True, repo_type="model")]
    assert len(hub.commits) == 1
    sent = hub.commits[0]
    assert sent["repo_id"] == "alice/edm2-digits" and sent["repo_type"] == "model"
    assert sent["message"] == "Upload EDM2 Config G pipeline: EMA std 0.050 (default), 0.100 at step 6"
    assert set(sent["files"]) == all_files(export_dir) == set(export_files(local))
    assert sent["files"] == snapshot(local)
    # The generated card now names the repository it was pushed to; the weights are untouched.
    readme = sent["files"]["README.md"].decode()
    assert '"alice/edm2-digits"' in readme and "someone/digits-edm2" not in readme
    weights = "unet/diffusion_pytorch_model.ema0100.safetensors"
    assert sent["files"][weights] == (export_dir / weights).read_bytes()
    assert commit.commit_message == sent["message"]


def test_push_deletes_what_the_new_export_no_longer_has(run_dir, export_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    local = tmp_path / "copy"
    shutil.copytree(export_dir, local)
    push_to_hub(local, "alice/edm2-digits")
    assert hub.commits[0]["deleted"] == []
    hub.files["alice/edm2-digits"]["notes/old.txt"] = b"left from an earlier upload"
    # A new export of the same run without the 0.100 variant, pushed to the same repository.
    export_pipelines(run_dir, [0.05], local, overwrite=True, sample_grid=False)
    push_to_hub(local, "alice/edm2-digits")
    assert len(hub.commits) == 2
    assert sorted(hub.commits[1]["deleted"]) == [
        "notes/old.txt",
        "samples.png",
        "unet/diffusion_pytorch_model.ema0100.safetensors",
    ]
    assert set(hub.files["alice/edm2-digits"]) == all_files(local) | {".gitattributes"}


def test_push_keeps_an_edited_card(export_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    local = tmp_path / "copy"
    shutil.copytree(export_dir, local)
    edited = (local / "README.md").read_text() + "\nA note by hand.\n"
    (local / "README.md").write_text(edited)
    push_to_hub(local, "bob/other", commit_message="my message")
    assert hub.commits[0]["files"]["README.md"].decode() == edited
    assert hub.commits[0]["message"] == "my message"


def load_example():
    spec = importlib.util.spec_from_file_location("export_pipeline_example", REPO_ROOT / "examples/export_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exports_and_pushes(run_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "cli"
    example = load_example()
    argv = ["--run_dir", str(run_dir), "--stds", "0.10,0.05", "--output_dir", str(out), "--step", "6"]
    example.main(argv + ["--push_to_hub", "--hub_model_id", "edm2-digits", "--license", "cc-by-4.0"])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline_edm2", "EDM2Pipeline"]
    assert read_export_info(out)["variants"][1]["variant"] == "ema0050"
    sent = hub.commits[0]
    assert sent["repo_id"] == "token-owner/edm2-digits"
    assert set(sent["files"]) == all_files(out)
    card = ModelCard(sent["files"]["README.md"].decode())
    assert card.data.license == "cc-by-4.0" and '"token-owner/edm2-digits"' in card.text


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


def test_push_without_a_repo_id_fails_before_writing(run_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    example = load_example()
    out = tmp_path / "never"
    base = ["--run_dir", str(run_dir), "--stds", "0.05", "--output_dir", str(out), "--push_to_hub"]
    with pytest.raises(ValueError, match="--hub_model_id"):
        example.main(base)
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        example.main(base + ["--hub_model_id", "a/b/c"])
    with pytest.raises(ValueError, match="hub_model_id"):
        export_run(run_dir, out, stds=[0.05], push_to_hub=True)
    assert not out.exists() and not hub.repos and not hub.commits
    with pytest.raises(ValueError, match="repository id"):
        push_to_hub(tmp_path, "")


@pytest.mark.parametrize(
    "stds, step, match",
    [([0.05, 0.3], None, "0.3"), ([0.05], 4, "no EMA snapshot at step 4"), (["0.05", "wide"], None, "'wide'")],
)
def test_unreconstructable_std_is_a_clear_error(run_dir, tmp_path, stds, step, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        export_pipelines(run_dir, stds, out, step=step)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()], "no staging folder may be left behind"


def test_existing_output_folder_is_never_touched_without_overwrite(run_dir, export_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_pipelines(run_dir, [0.05], out, sample_grid=False)
    with pytest.raises(ValueError, match="not a pipeline export"):
        export_pipelines(run_dir, [0.05], out, overwrite=True, sample_grid=False)
    assert all_files(out) == {"notes.txt"} and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="would contain the run folder"):
        export_pipelines(run_dir, [0.05], run_dir, overwrite=True)

    previous = tmp_path / "previous"
    shutil.copytree(export_dir, previous)
    before = snapshot(previous)
    with pytest.raises(FileExistsError):
        export_pipelines(run_dir, [0.10], previous, sample_grid=False)
    assert snapshot(previous) == before
    export_pipelines(run_dir, [0.10], previous, overwrite=True, sample_grid=False)
    assert not (previous / "unet" / "diffusion_pytorch_model.ema0050.safetensors").exists()
    assert read_export_info(previous)["variants"] == [{"std": 0.10, "variant": "ema0100", "metrics": {}}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "previous"]


def test_best_without_a_sweep_is_a_clear_error(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="best.json"):
        export_pipelines(run_dir, "best", tmp_path / "out")


def test_check_export_refuses_pickles(export_dir, tmp_path):
    local = tmp_path / "copy"
    shutil.copytree(export_dir, local)
    torch.save({"w": torch.zeros(1)}, local / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors weights only"):
        check_export(local)
    with pytest.raises(ValueError, match="safetensors weights only"):
        push_to_hub(local, "alice/x")


def test_export_run_defaults_to_the_config_stds(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = export_run(run, sample_grid=False)
    assert result.output_dir == run / "pipeline"
    assert [s for s, _ in result.variants] == [0.05, 0.10]
    check_export(run / "pipeline")


def test_class_conditional_export(tmp_path):
    run = train_run(tmp_path / "run", num_class_embeds=10)
    out = tmp_path / "out"
    export_pipelines(run, [0.10], out)
    card = ModelCard.load(out / "README.md")
    assert "class-conditional-image-generation" in card.data.tags and "class-conditional (10 classes)" in card.text
    assert "one class per row" in card.text and (out / "samples.png").is_file()
    pipe = load_pipeline(out)
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    images = pipe(batch_size=2, class_labels=[0, 9], latents=noise, num_inference_steps=STEPS, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and not np.allclose(images[0], images[1])


# ----------------------------------------------------------------------------------------------------------------
# The bundler, on a small package written here.


def write_package(root: Path, name: str, files: dict[str, str]) -> None:
    for rel, code in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))


def test_bundle_flattens_relative_aliased_nested_and_reexported_imports(tmp_path, monkeypatch):
    name = "bundletestpkg"
    write_package(
        tmp_path,
        name,
        {
            "__init__.py": "from .core.math import double\n",
            "core/__init__.py": "",
            "core/math.py": """
                from __future__ import annotations

                SCALE = 2

                def double(x):
                    return SCALE * x

                __all__ = ["double"]
            """,
            "app.py": """
                import math

                from . import double as _unused  # noqa
                from .core.math import (
                    SCALE,
                    double as twice,
                )

                def run(x):
                    from bundletestpkg.core.math import double
                    return twice(x) + double(x) + SCALE + math.floor(0.5)

                __all__ = ["run"]
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = bundle_module(f"{name}.app", header="test bundle", package=name)
    lines = [line for line in code.splitlines() if line.strip()]
    assert lines[:2] == ["# test bundle", "from __future__ import annotations"]
    assert name not in re.sub(r"^# .*$", "", code, flags=re.M), "package imports must all be gone"
    scope = {}
    exec(compile(code, "bundle", "exec"), scope)
    assert scope["run"](5) == 10 + 10 + 2
    assert scope["__all__"] == ["run"]


@pytest.mark.parametrize(
    "app, match",
    [
        ("from .a import f\ndef f():\n    return 2\n", "means different things"),
        ("from .a import *\n", "import names explicitly"),
        ("import {name}.a\n", "cannot be bundled"),
        ("from . import a\n", "imports a module"),
    ],
)
def test_bundle_errors(tmp_path, monkeypatch, app, match):
    name = "bundleerrpkg" + str(abs(hash(match)) % 10_000)
    write_package(
        tmp_path, name, {"__init__.py": "", "a.py": "def f():\n    return 1\n", "app.py": app.format(name=name)}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BundleError, match=match):
        bundle_module(f"{name}.app", package=name)
