"""Training config (YAML + flags), the learning-rate schedule and the EDM2 loss."""

import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.training import (
    EDM2TrainingLoss,
    edm2_loss,
    learning_rate,
    load_config,
    sample_sigma,
    schedule_in_images,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for d in ("cifar10", "cifar100", "tinyimagenet", "digits") for p in (ROOT / "configs" / d).glob("*.yaml")
)
TINY = tiny_unet_config()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ config


def test_yaml_values_flags_override_and_float_strings(tmp_path):
    cfg_file = write(
        tmp_path / "c.yaml",
        "model: {architecture: G, sample_size: 8}\n"
        "training: {learning_rate: 4e-4, train_batch_size: 16, max_train_steps: 7, lr_warmup_images: 1_000}\n"
        "data: {random_flip: true, dataset_name: a/b}\n",
    )
    cfg = load_config(cfg_file)
    assert cfg["training"]["learning_rate"] == pytest.approx(4e-4)  # PyYAML reads 4e-4 as a string
    assert cfg["training"]["lr_warmup_images"] == 1000
    assert cfg["training"]["train_batch_size"] == 16 and cfg["data"]["random_flip"] is True
    assert cfg["training"]["adam_beta2"] == 0.99 and cfg["sampling"]["num_inference_steps"] == 18  # defaults kept

    cfg = load_config(cfg_file, {"training.learning_rate": 1e-3, "data.random_flip": False, "training.seed": 5})
    assert cfg["training"]["learning_rate"] == 1e-3 and cfg["data"]["random_flip"] is False
    assert cfg["training"]["seed"] == 5 and cfg["training"]["max_train_steps"] == 7


def test_flag_replaces_the_yaml_spelling_of_the_same_quantity(tmp_path):
    cfg_file = write(
        tmp_path / "c.yaml",
        "data: {source: sklearn_digits}\n"
        "training: {total_batch_size: 512, lr_warmup_images: 100, max_train_steps: 3}\n",
    )
    cfg = load_config(
        cfg_file,
        {
            "training.train_batch_size": 8,
            "training.lr_warmup_steps": 4,
            "data.dataset_name": "x/y",
            "training.num_epochs": 2,
        },
    )
    assert cfg["training"]["total_batch_size"] is None and cfg["training"]["train_batch_size"] == 8
    assert cfg["training"]["lr_warmup_images"] is None and cfg["training"]["lr_warmup_steps"] == 4
    assert cfg["data"]["source"] is None and cfg["data"]["dataset_name"] == "x/y"
    assert cfg["training"]["max_train_steps"] is None and cfg["training"]["num_epochs"] == 2
    # Two flags for the same quantity both stay, and validation names the clash.
    both = load_config(cfg_file, {"training.train_batch_size": 8, "training.total_batch_size": 64})
    assert both["training"]["train_batch_size"] == 8 and both["training"]["total_batch_size"] == 64


@pytest.mark.parametrize(
    "text, named",
    [
        ("trainig: {seed: 1}\n", "'trainig'"),
        ("training: {lr: 0.1}\n", "'training.lr'"),
        ("data: {image_col: img}\n", "'data.image_col'"),
        ("sampling: {steps: 3}\n", "'sampling.steps'"),
        ("model: {channels: 3}\n", "'model.channels'"),
    ],
)
def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, text, named):
    with pytest.raises(ValueError, match=named):
        load_config(write(tmp_path / "c.yaml", text))


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="training.max_train_steps"):
        load_config(write(tmp_path / "a.yaml", "training: {max_train_steps: lots}\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    base = {"training.output_dir": str(tmp_path / "o"), "training.train_batch_size": 4, "training.max_train_steps": 1}
    cfg = load_config(write(tmp_path / "b.yaml", "model: {sample_size: 8}\n"), base)
    validate_config(cfg)
    for key, value, match in [
        ("training.mixed_precision", "fp8", "mixed_precision"),
        ("training.gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
        ("training.report_to", "mlflow", "report_to"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate_config(load_config(tmp_path / "b.yaml", {**base, key: value}))
    with pytest.raises(ValueError, match="output_dir"):
        validate_config(load_config(tmp_path / "b.yaml", {**base, "training.output_dir": None}))
    with pytest.raises(ValueError, match="--max_train_steps or --num_epochs"):
        validate_config(load_config(tmp_path / "b.yaml", {**base, "training.max_train_steps": None}))
    for key, value, match in [
        ("training.lr_schedule", "cosine", "lr_schedule"),
        ("training.loss_reduction", "sum", "loss_reduction"),
        ("data.crop", "random", "data.crop"),
        ("sampling.mixed_precision", "fp8", "sampling.mixed_precision"),
        ("training.lr_warmup_epochs", -1, "lr_warmup_epochs"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate_config(load_config(tmp_path / "b.yaml", {**base, key: value}))
    # each schedule reads its own keys: a key of the other one is an error, not silently ignored
    with pytest.raises(ValueError, match="lr_warmup_epochs is set but training.lr_schedule is images"):
        validate_config(load_config(tmp_path / "b.yaml", {**base, "training.lr_warmup_epochs": 5}))
    epochs = {**base, "training.lr_schedule": "epochs"}
    with pytest.raises(ValueError, match="lr_decay_ref_steps is set but training.lr_schedule is epochs"):
        validate_config(load_config(tmp_path / "b.yaml", {**epochs, "training.lr_decay_ref_steps": 5}))
    validate_config(load_config(tmp_path / "b.yaml", {**epochs, "training.lr_warmup_epochs": 5}))
    with pytest.raises(ValueError, match="data.crop dhariwal crops to data.resolution"):
        validate_config(load_config(tmp_path / "b.yaml", {**base, "data.crop": "dhariwal"}))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load_and_build(path):
    cfg = validate_config(load_config(path, {"training.output_dir": "unused"}))
    assert cfg["sampling"]["num_inference_steps"] == 18
    assert (cfg["model"].get("num_class_embeds") is None) == (cfg["data"]["label_column"] is None)
    if path.parent.name == "digits":
        EDM2UNet2DModel(**cfg["model"])  # the quickstart models are small enough to build here


@pytest.mark.parametrize("dataset, images", [("cifar10", 50_000), ("cifar100", 50_000), ("tinyimagenet", 100_000)])
def test_dataset_configs_carry_the_edm2_multigpu_hyper_parameters(dataset, images):
    c = load_config(ROOT / "configs" / dataset / "C.yaml")["training"]
    e = load_config(ROOT / "configs" / dataset / "E.yaml")["training"]
    g = load_config(ROOT / "configs" / dataset / "G.yaml")["training"]
    cifar = dataset != "tinyimagenet"
    assert c["total_batch_size"] == e["total_batch_size"] == g["total_batch_size"] == (512 if cifar else 192)
    assert c["learning_rate"] == (4e-4 if cifar else 1.5e-4)
    assert e["learning_rate"] == g["learning_rate"] == (2e-2 if cifar else 7.5e-3)
    for t in (c, e, g):  # per-epoch schedule with a 200-epoch warm-up, last batch kept, P_mean/P_std of the runs
        assert t["lr_schedule"] == "epochs" and t["lr_warmup_epochs"] == 200 and t["drop_last"] is False
        assert (t["P_mean"], t["P_std"]) == (-1.2, 1.2)
        assert not t["lr_warmup_images"] and not t["lr_decay_ref_images"]
    assert c["lr_decay_ref_epochs"] is None and e["lr_decay_ref_epochs"] == g["lr_decay_ref_epochs"] == 400
    assert c["num_epochs"] == (1000 if cifar else 2000) and e["num_epochs"] == 2000
    flips = load_config(ROOT / "configs" / dataset / "E.yaml")["data"]["random_flip"]
    assert flips is cifar


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tinyimagenet"])
@pytest.mark.parametrize("arch", ["C", "E", "G"])
def test_seed_configs_use_edm2_multigpu_optimizer_and_precision(dataset, arch):
    # edm2-multi-gpu builds torch.optim.Adam(params, lr): torch's default betas and eps, read from torch itself.
    defaults = inspect.signature(torch.optim.Adam).parameters
    t = load_config(ROOT / "configs" / dataset / f"{arch}.yaml")["training"]
    assert (t["adam_beta1"], t["adam_beta2"]) == tuple(defaults["betas"].default)
    assert t["adam_epsilon"] == defaults["eps"].default
    assert t["mixed_precision"] == "fp16"  # its documented commands pass --use_amp (fp16 autocast + GradScaler)
    cfg = load_config(ROOT / "configs" / dataset / f"{arch}.yaml")
    assert cfg["sampling"]["mixed_precision"] == "fp16"  # sample.py --use_amp
    assert t["loss_reduction"] == "mean" and t["zero_nonfinite_grads"] is False  # its loss_4shape.mean(), scaler


def test_ema_section_is_checked_when_the_config_is_validated(tmp_path):
    base = "model: {sample_size: 8}\ntraining: {train_batch_size: 4, max_train_steps: 1, output_dir: o}\n"
    bad = write(tmp_path / "bad.yaml", base + "ema: {type: traditional, posthoc: {stds: [0.05], every: 3}}\n")
    with pytest.raises(ValueError, match="ema.posthoc.every"):
        validate_config(load_config(bad))
    good = write(tmp_path / "good.yaml", base + "ema: {type: traditional, posthoc: {stds: [0.05]}}\n")
    cfg = load_config(good, {"ema.snapshot_every_steps": 7})  # the flag sets the post-hoc snapshot spacing
    assert validate_config(cfg)["ema"]["posthoc"] == {"stds": [0.05], "snapshot_every_steps": 7}


# ------------------------------------------------------------------------------------------------ schedule


def test_learning_rate_warmup_then_inverse_sqrt_decay():
    # CIFAR Config E: α_ref 2e-2, warm-up 10 M images, t_ref 20 M images.
    lr = lambda t: learning_rate(t, 2e-2, 10_000_000, 20_000_000)  # noqa: E731
    assert lr(1_000_000) == pytest.approx(2e-3)
    assert lr(5_000_000) == pytest.approx(1e-2)
    assert lr(10_000_000) == lr(20_000_000) == pytest.approx(2e-2)
    assert lr(80_000_000) == pytest.approx(1e-2)  # 1/sqrt(4)
    assert lr(45_000_000) == pytest.approx(2e-2 / math.sqrt(2.25))
    assert learning_rate(10**9, 4e-4, 10_000_000, None) == 4e-4  # Config C: no decay
    assert learning_rate(7, 1.0, 0, 0) == 1.0
    with pytest.raises(ValueError):
        learning_rate(-1, 1.0)


def test_schedule_in_steps_converts_to_images():
    assert schedule_in_images({"lr_warmup_steps": 10, "lr_decay_ref_steps": 30}, 64) == (640, 1920)
    assert schedule_in_images({"lr_warmup_images": 500, "lr_decay_ref_images": 0}, 64) == (500, None)


# ------------------------------------------------------------------------------------------------ loss


def test_loss_matches_the_formula_on_a_known_case():
    # A fresh Config G net has output gain 0, so F = 0 and D = c_skip·(y + σε): the loss is known in closed form.
    unet = EDM2UNet2DModel(**TINY)
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(y)
    sigma = torch.tensor([0.02, 0.7, 15.0])
    sd = 0.5
    loss = edm2_loss(unet, y, sigma, eps, sigma_data=sd)

    s = sigma.view(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    u = unet.logvar(sigma.log() / 4).view(-1, 1, 1, 1)
    expected = (weight / u.exp() * (c_skip * (y + s * eps) - y) ** 2 + u).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    # Gradients reach the network and the uncertainty head, through the module Accelerate wraps.
    module = EDM2TrainingLoss(unet, sigma_data=sd)
    module(y, sigma, eps).backward()
    assert unet.out_gain.grad is not None and unet.out_gain.grad.abs() > 0
    assert unet.logvar_linear.weight.grad.abs().sum() > 0


def test_sigma_is_log_normal():
    g = torch.Generator().manual_seed(1)
    log_sigma = sample_sigma(200_000, -1.2, 1.2, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_script_help_lists_the_diffusers_flags(capsys):
    spec = importlib.util.spec_from_file_location("train_edm2", ROOT / "examples" / "train_edm2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--output_dir",
        "--dataset_name",
        "--dataset_config_name",
        "--train_data_dir",
        "--image_column",
        "--label_column",
        "--resolution",
        "--train_batch_size",
        "--gradient_accumulation_steps",
        "--mixed_precision",
        "--max_train_steps",
        "--num_epochs",
        "--checkpointing_steps",
        "--checkpoints_total_limit",
        "--resume_from_checkpoint",
        "--report_to",
        "--seed",
        "--dataloader_num_workers",
        "--ema_snapshot_steps",
    ):
        assert flag in out
