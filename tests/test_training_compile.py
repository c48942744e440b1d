"""``torch.compile`` from the trainer (``--torch_compile`` or Accelerate's dynamo setting): the loss and the sample
grids' network compile once and never again, checkpoints stay plain (a compiled run and an eager run resume each
other's), and a compiled run resumes bit for bit.

The runs use the ``aot_eager`` backend (``training.compile_backend``): the whole dynamo/AOTAutograd path without
inductor's C++ build, which takes minutes on this CPU; the default backend is inductor.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training_loop import tiny_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.training import load_config, train
from edm2_diffusers.training.compile import compile_options


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each run compiles from scratch, as a new process would
    yield
    torch._dynamo.reset()


def run(tmp_path, out, compiled=True, resume=None, **training):
    settings = dict(max_train_steps=3, checkpointing_steps=1, sample_every_steps=1, export_pipeline=False)
    settings.update(training)
    if compiled:
        settings.update(torch_compile=True, compile_backend="aot_eager")
    overrides = {"training.output_dir": str(out)}
    if resume:
        overrides["training.resume_from_checkpoint"] = resume
    return train(load_config(tiny_config(tmp_path, **settings), overrides))


def copy_run(src, dst, keep: int):
    """A copy of a run folder as it stood after checkpoint ``keep`` (later checkpoints removed)."""
    shutil.copytree(src, dst)
    for ck in dst.glob("checkpoint-*"):
        if int(ck.name.split("-")[1]) > keep:
            shutil.rmtree(ck)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compiled")
    torch._dynamo.reset()
    return tmp, run(tmp, tmp / "run")


def test_compiled_run_compiles_once_and_writes_plain_checkpoints(compiled):
    tmp, result = compiled
    out = tmp / "run"
    stats = result.compile_stats
    assert stats["training_graphs"] >= 1 and stats["sampling_graphs"] >= 1  # it did compile ...
    assert stats["training_recompiles"] == 0 and stats["sampling_recompiles"] == 0  # ... once: 3 steps, 3 grids
    assert len(result.sample_grids) == 3

    # The trained and averaged modules are the plain U-Net, and the checkpoint holds its names.
    assert type(result.unet) is EDM2UNet2DModel
    assert all(type(net) is EDM2UNet2DModel for _, net in result.ema.averaged_models())
    weights = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert set(weights) == {f"unet.{name}" for name in result.unet.state_dict()}
    for name, param in result.unet.state_dict().items():
        assert torch.equal(weights[f"unet.{name}"], param)
    recorded = yaml.safe_load((out / "config.yaml").read_text())["training"]
    assert recorded["torch_compile"] is True and recorded["compile_backend"] == "aot_eager"


def test_a_compiled_run_resumes_bit_for_bit(compiled, tmp_path):
    tmp, reference = compiled
    copy_run(tmp / "run", tmp_path / "run", keep=1)
    resumed = run(tmp_path, tmp_path / "run", resume="latest")
    assert resumed.step == 3 and resumed.compile_stats["training_recompiles"] == 0
    for name, param in reference.unet.state_dict().items():
        assert torch.equal(resumed.unet.state_dict()[name], param), name
    for (_, a), (_, b) in zip(reference.ema.averaged_models(), resumed.ema.averaged_models()):
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)


def test_compiled_and_eager_runs_resume_from_each_others_checkpoints(compiled, tmp_path):
    tmp, reference = compiled
    # Eager from the compiled run's checkpoint-2 ...
    copy_run(tmp / "run", tmp_path / "run", keep=2)
    eager = run(tmp_path, tmp_path / "run", compiled=False, resume="latest")
    assert eager.step == 3 and eager.compile_stats is None
    for name, param in reference.unet.state_dict().items():  # the same step, up to the compiler's rounding
        torch.testing.assert_close(eager.unet.state_dict()[name], param, rtol=1e-4, atol=1e-5)
    # ... and compiled again from the eager run's checkpoint-3, one step further.
    more = run(tmp_path, tmp_path / "run", resume="latest", max_train_steps=4)
    assert more.step == 4 and more.compile_stats["training_graphs"] >= 1
    assert load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors")).keys() == {
        f"unet.{name}" for name in more.unet.state_dict()
    }


def test_compile_options_default_to_inductor_and_honour_accelerates_dynamo_setting(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert compile_options({"torch_compile": False, "compile_backend": None}) is None
    assert compile_options({"torch_compile": True, "compile_backend": None}) == {"backend": "inductor"}
    assert compile_options({"torch_compile": True, "compile_backend": "aot_eager"}) == {"backend": "aot_eager"}
    # `accelerate launch --dynamo_backend eager --dynamo_mode max-autotune` sets these for the script.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    options = compile_options({"torch_compile": False, "compile_backend": None})
    assert options["backend"] == "eager" and options["mode"] == "max-autotune"
