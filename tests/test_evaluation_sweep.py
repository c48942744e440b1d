"""EMA sweep, the evaluation scripts, and multi-process generation, on a tiny digits run made by the real trainer."""

import csv
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cache_root, free_port
from loopback import run_on_loopback
from PIL import Image

from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler
from edm2_diffusers.ema import parse_stds
from edm2_diffusers.evaluation import FeatureStats, dataset_image_batches, digits_reference_stats, evaluate_pipeline
from edm2_diffusers.evaluation.sweep import plot_sweep, sweep_ema
from edm2_diffusers.runs import read_sweep, run_scheduler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return cache_root()  # conftest: one session cache, outside $HOME


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """12 optimizer steps of a tiny class-conditional digits model, EMA snapshots every 4 steps."""
    from edm2_diffusers.training.config import load_config
    from edm2_diffusers.training.loop import train

    out = str(tmp_path_factory.mktemp("run"))
    cfg = load_config(ROOT / "configs" / "digits" / "G.yaml")
    cfg["model"].update(model_channels=16, channel_mult=[1, 2], num_blocks=1, channels_per_head=16, logvar_channels=16)
    cfg["training"].update(
        output_dir=out,
        max_train_steps=12,
        total_batch_size=32,
        checkpointing_steps=0,
        sample_every_steps=0,
        report_to="none",
        lr_warmup_images=0,
    )
    cfg["ema"].update(stds=[0.05, 0.10], snapshot_every_steps=4)
    cfg["sampling"].update(grid_rows=2, grid_cols=2, num_inference_steps=2)
    train(cfg)
    return out


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_stds():
    assert parse_stds("0.05:0.15:0.05", sort=True) == [0.05, 0.1, 0.15]
    assert len(parse_stds("0.02:0.20:0.01", sort=True)) == 19
    assert parse_stds("0.10,0.05,0.10", sort=True) == [0.05, 0.1]
    for bad in ("0.05:0.15", "a,b", "0.1:0.05:0.01", "0.05:0.1:0", "0.3", ""):
        with pytest.raises(ValueError):
            parse_stds(bad, sort=True)


def test_sweep_writes_csv_plot_and_best(tiny_run, cache_dir, tmp_path):
    out = str(tmp_path / "sweep")
    result = sweep_ema(
        tiny_run,
        "0.05,0.10,0.15",
        "digits",
        digits_reference_stats(),
        num_images=16,
        num_inference_steps=2,
        batch_size=8,
        output_dir=out,
        progress=False,
    )
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["std"]) for r in rows] == [0.05, 0.1, 0.15]
    values = [float(r["fd"]) for r in rows]
    assert all(math.isfinite(v) for v in values)
    assert len(set(values)) == 3  # each EMA length is its own network
    assert all(0 <= float(r["confident"]) <= 1 and int(r["step"]) == 12 for r in rows)
    with Image.open(os.path.join(out, "sweep.png")) as img:
        assert img.size == (720, 480)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # something was drawn

    best = json.loads(Path(out, "best.json").read_text())
    assert best["std"] == result.best_std == [0.05, 0.1, 0.15][values.index(min(values))]
    assert best["value"] == pytest.approx(min(values)) and best["metric"] == "fd"

    # The export reads the winner from this file (export_pipeline.py --stds best --sweep_dir OUT).

    assert read_sweep(tiny_run, out)["std"] == best["std"]

    with pytest.raises(FileExistsError, match="overwrite"):
        sweep_ema(tiny_run, "0.05", "digits", digits_reference_stats(), 4, 2, output_dir=out, progress=False)
    assert len(Path(out, "sweep.csv").read_text().splitlines()) == 4  # untouched


def test_sweep_is_reproducible_and_matches_direct_evaluation(tiny_run, cache_dir):
    from edm2_diffusers.ema import reconstruct

    ref = digits_reference_stats()
    a = sweep_ema(tiny_run, [0.1], "digits", ref, 10, 2, batch_size=5, progress=False)
    rec = reconstruct(tiny_run, [0.1])
    pipe = EDM2Pipeline(rec.model(0), run_scheduler(tiny_run))
    direct = evaluate_pipeline(pipe, "digits", ref, 10, batch_size=5, num_inference_steps=2, progress=False)
    assert a.rows[0]["fd"] == pytest.approx(direct.fd, rel=1e-6)
    assert a.files == {}  # nothing written without an output folder


def test_sweep_over_samplers_records_the_cheapest(tiny_run, cache_dir, tmp_path):
    """Scheduler and step count swept with the EMA length: NFE in the CSV, a metric-vs-NFE plot, and best.json's
    cheapest setting within the margin, which read_sweep hands to an export."""
    from diffusers import EDMDPMSolverMultistepScheduler

    from edm2_diffusers.ema import reconstruct

    out = str(tmp_path / "sweep")
    ref = digits_reference_stats()
    kw = dict(num_images=12, batch_size=6, output_dir=out, progress=False)
    samplers = "heun:3,dpmsolver:3,euler:2"
    result = sweep_ema(tiny_run, "0.05,0.10", "digits", ref, samplers=samplers, margin="1000%", **kw)
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["std"], r["scheduler"], r["num_inference_steps"], r["nfe"]) for r in rows[:3]] == [
        ("0.05", "EDMHeunScheduler", "3", "5"),
        ("0.05", "EDMDPMSolverMultistepScheduler", "3", "3"),
        ("0.05", "EDMEulerScheduler", "2", "2"),
    ]
    assert len(rows) == 6 and len({r["fd"] for r in rows}) == 6
    # A row is the same evaluation as the pipeline with that scheduler, built from the run's sampler settings.
    rec = reconstruct(tiny_run, [0.10])
    dpm = EDMDPMSolverMultistepScheduler.from_config(run_scheduler(tiny_run).config)
    direct = evaluate_pipeline(EDM2Pipeline(rec.model(0), dpm), "digits", ref, 12, 6, 3, progress=False)
    assert float(rows[4]["fd"]) == pytest.approx(direct.fd, rel=1e-6)

    with Image.open(os.path.join(out, "sweep_nfe.png")) as img:
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    best = json.loads(Path(out, "best.json").read_text())
    fds = {(float(r["std"]), int(r["nfe"])): float(r["fd"]) for r in rows}
    assert best["value"] == pytest.approx(min(fds.values()))
    # With a margin of 1000 %, every sampler at the best std qualifies: the cheapest is Euler with 2 evaluations.
    assert best["cheapest"]["nfe"] == 2 and best["cheapest"]["scheduler"] == "EDMEulerScheduler"
    assert best["cheapest"]["std"] == best["std"] == result.best_std
    assert best["cheapest"]["value"] == pytest.approx(fds[(best["std"], 2)])
    assert len(best["samplers"]) == 6 and len(best["results"]) == 2  # results: each std under the best's sampler
    info = read_sweep(tiny_run, out)
    assert info["cheapest"]["num_inference_steps"] == 2 and info["sampler"]["nfe"] == best["sampler"]["nfe"]
    assert set(info["metrics"]) == {0.05, 0.10}

    # A tight margin keeps the best setting itself.
    tight = sweep_ema(tiny_run, "0.10", "digits", ref, samplers="heun:3,euler:2", margin="0%", **kw, overwrite=True)
    assert tight.cheapest["nfe"] == tight.best_row["nfe"]


def test_run_scheduler_reads_run_config(tiny_run, tmp_path):
    sched = run_scheduler(tiny_run)
    assert sched.config.sigma_max == 80.0 and sched.config.sigma_data == 0.5
    (tmp_path / "config.yaml").write_text("sampling: {sigma_max: 40.0, rho: 5.0}\ntraining: {sigma_data: 0.25}\n")
    sched = run_scheduler(str(tmp_path))
    assert (sched.config.sigma_max, sched.config.rho, sched.config.sigma_data) == (40.0, 5.0, 0.25)


def test_plot_marks_best(tmp_path):
    path = plot_sweep(str(tmp_path / "p.png"), [0.05, 0.1, 0.15], [3.0, 1.0, float("nan")], 1, "fid", 100)
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    red = int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())
    assert red > 20


def test_scripts_sweep_and_linear_probe(tiny_run, cache_dir, tmp_path, capsys):
    sweep = load_script("sweep_ema")
    result = sweep.main(
        [
            "--run_dir",
            tiny_run,
            "--stds",
            "0.05:0.15:0.05",
            "--num_images",
            "8",
            "--num_inference_steps",
            "2",
            "--batch_size",
            "8",
            "--feature_extractor",
            "digits",
        ]
    )
    assert len(result.rows) == 3
    assert os.path.isfile(os.path.join(tiny_run, "sweep", "best.json"))  # default place, where the export looks
    printed = capsys.readouterr().out
    assert "best EMA std" in printed and printed.count("std 0.") >= 3

    probe = load_script("linear_probe")
    out = probe.main(["--run_dir", tiny_run, "--ema_std", "0.1", "--num_epochs", "3"])
    printed = capsys.readouterr().out
    assert "linear probe accuracy:" in printed and f"{out.accuracy:.4f}" in printed
    assert out.accuracy > 0.2  # chance is 0.1

    with pytest.raises(ValueError, match="decoder block"):
        probe.main(["--run_dir", tiny_run, "--block", "64x64_up", "--num_epochs", "1"])


def test_scripts_read_the_runs_dataset(tiny_run, cache_dir, tmp_path, capsys):
    """Given a run, the scripts take its dataset, image and label columns and splits (CIFAR-10's image column is
    `img`); a seed dataset selects edm2-multi-gpu's probe; the seed protocol runs on a digits run's exported EMA."""
    evaluate, probe = load_script("evaluate"), load_script("linear_probe")
    for name, label, test_split in (("cifar10", "label", "test"), ("cifar100", "fine_label", "test")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text((ROOT / "configs" / name / "E.yaml").read_text())
        args = evaluate.parse_args(["--run_dir", str(run)])
        assert (args.dataset_name, args.image_column, args.resolution) == (f"uoft-cs/{name}", "img", 32)
        assert args.pipeline == os.path.join(str(run), "pipeline") and args.dataset_split == "train"
        assert evaluate.parse_args(["--run_dir", str(run), "--image_column", "x"]).image_column == "x"
        args = probe.parse_args(["--run_dir", str(run)])
        protocol, _ = probe.resolve(args)
        assert protocol is not None and protocol.timestep == 4
        columns = (args.image_column, args.label_column, args.train_split, args.test_split)
        assert columns == ("img", label, "train", test_split)
        args = probe.parse_args(["--run_dir", str(run), "--protocol", "package", "--label_column", "coarse_label"])
        assert probe.resolve(args)[0] is None and args.label_column == "coarse_label"
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.yaml").write_text((ROOT / "configs" / "tinyimagenet" / "C.yaml").read_text())
    args = probe.parse_args(["--run_dir", str(tiny)])
    assert probe.resolve(args)[0].timestep == 5 and args.test_split == "valid" and args.image_column == "image"

    # The digits run: its export (the run's EMA) probed by the seed protocol, on the digits' train/test split.
    out = probe.main(
        ["--run_dir", tiny_run, "--protocol", "edm2-multi-gpu", "--block", "8x8_up", "--num_epochs", "2",
         "--batch_size", "64", "--max_images", "128"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "edm2-multi-gpu protocol" in printed and out.block == "8x8_up" and len(out.learning_rates) == 2
    assert out.sigma == pytest.approx(0.0599, abs=1e-4)
    result = evaluate.main(["--run_dir", tiny_run, "--feature_extractor", "digits", "--num_images", "8",
                            "--batch_size", "8", "--num_inference_steps", "2"])  # fmt: skip
    assert result["pipeline"] == os.path.join(tiny_run, "pipeline") and math.isfinite(result["fd"])


def test_multiprocess_evaluation_equals_one_process(tiny_run, cache_dir, tmp_path):
    """Two CPU processes split the seeds and the reference images; merged once, they give one process's result.

    The generated images are the same, seed for seed: each batch's features (kept by --cache_dir under the batch's
    seeds) are equal bit for bit (both runs use one thread). The reference statistics of the 1797 digits, and the
    distance, agree to float64 round-off: each process adds up its own batches' sums before the two are added,
    where one process adds the batches in turn (measured: 0 on μ, 7e-16 relative on Σ, 4e-15 on the distance).
    90 images, more than the 64 features: with fewer, Σ is singular and the square roots of its round-off-sized
    eigenvalues turn 1e-16 into ~1e-9 (measured 8e-10 with 22 images).
    """
    from edm2_diffusers.ema import reconstruct

    # Each process decodes only its batches of reference images: 0, 2, 4, 6 and 1, 3, 5, 7 of the 8 batches of 250.
    whole = list(dataset_image_batches("digits", batch_size=250))
    shares = [list(dataset_image_batches("digits", batch_size=250, process_index=p, num_processes=2)) for p in (0, 1)]
    assert [len(b) for b in whole] == [250] * 7 + [47] and [len(s) for s in shares] == [4, 4]
    assert all(torch.equal(b, shares[i % 2][i // 2]) for i, b in enumerate(whole))

    pipe_dir = str(tmp_path / "pipe")
    EDM2Pipeline(reconstruct(tiny_run, [0.1]).model(0), EDMHeunScheduler()).save_pretrained(pipe_dir)
    common = ["--pipeline", pipe_dir, "--feature_extractor", "digits", "--dataset_name", "digits", "--num_images",
              "90", "--batch_size", "16", "--num_inference_steps", "2", "--seed", "7"]  # fmt: skip

    def outputs(name):
        folder = tmp_path / name
        return folder, ["--cache_dir", str(folder / "features"), "--ref_stats", str(folder / "ref.npz"),
                        "--output_json", str(folder / "result.json")]  # fmt: skip

    two, two_args = outputs("two")
    env = dict(os.environ, OMP_NUM_THREADS="1", EDM2_DIFFUSERS_CACHE=cache_dir)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(ROOT / "examples" / "evaluate.py"), *common, *two_args]  # fmt: skip
    proc = run_on_loopback(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads((two / "result.json").read_text())
    assert multi["num_images"] == 90 and multi["num_processes"] == 2
    assert sorted(os.listdir(two)) == ["features", "ref.npz", "result.json"]

    one, one_args = outputs("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = load_script("evaluate").main(common + one_args)
    finally:
        torch.set_num_threads(threads)
    assert single["num_processes"] == 1

    # The same batches of seeds, the same images: features equal bit for bit.
    batches = sorted(n for n in os.listdir(one / "features") if n.startswith("batch-"))
    assert batches == sorted(n for n in os.listdir(two / "features") if n.startswith("batch-"))
    seeds = []
    for name in batches:
        with np.load(one / "features" / name) as a, np.load(two / "features" / name) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name
            seeds += a["seeds"].tolist()
    assert seeds == list(range(7, 97))

    ref_one, ref_two = FeatureStats.load(one / "ref.npz"), FeatureStats.load(two / "ref.npz")
    assert ref_one.num_samples == ref_two.num_samples == 1797
    mu_err = np.abs(ref_one.mu - ref_two.mu).max() / np.abs(ref_one.mu).max()
    sigma_err = np.abs(ref_one.sigma - ref_two.sigma).max() / np.abs(ref_one.sigma).max()
    fd_err = abs(single["fd"] - multi["fd"]) / single["fd"]
    print(f"relative differences: mu {mu_err:.1e}, sigma {sigma_err:.1e}, fd {fd_err:.1e}")
    assert mu_err < 1e-13 and sigma_err < 1e-13 and fd_err < 1e-12
    assert single["confident"] == multi["confident"]


def test_seed_probe_on_two_processes(tiny_run, cache_dir):
    """The seed probe over two CPU processes: the learning rate is 1e-3 × 2, the accuracy covers the test split."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "linear_probe.py"),
        "--run_dir", tiny_run, "--protocol", "edm2-multi-gpu", "--block", "8x8_up", "--num_epochs", "2",
        "--batch_size", "32", "--max_images", "96",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", EDM2_DIFFUSERS_CACHE=cache_dir)
    proc = run_on_loopback(cmd, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(line)
    assert result["num_processes"] == 2 and result["protocol"] == "edm2-multi-gpu"
    assert result["learning_rates"] == pytest.approx([2e-3, 1e-3])
    assert 0 <= result["accuracy"] <= 1 and round(result["accuracy"] * 96) == pytest.approx(result["accuracy"] * 96)
