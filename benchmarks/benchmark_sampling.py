"""Sampling throughput: ``EDM2Pipeline`` against edm2-multi-gpu's ``EDM.edm_sample`` on the same network.

Examples::

    python benchmarks/benchmark_sampling.py --compare_multigpu /path/to/edm2-multi-gpu --batch_size 4
    python benchmarks/benchmark_sampling.py --compare_multigpu /path/to/edm2-multi-gpu --compile --precision bf16

The reference's network (``UNetC``/``UNetE`` with the config's sizes, random weights) is converted to an
``EDM2UNet2DModel`` with :func:`edm2_diffusers.convert.from_multigpu`, so both samplers run the same weights. Both
draw ``--steps`` deterministic Heun steps (2N−1 network evaluations, 35 for 18 steps) with the σ schedule and the
D-clipping of the config's ``sampling`` section (the scheduler the trainer builds, :func:`runs.scheduler_from_config`).
The two are timed in interleaved rounds (ours, the reference's, ours, ...) and each keeps its best round; peak
memory is the high-water mark of a sampling call (CUDA allocator, or resident set size on a CPU). ``--compile``
compiles both networks with ``torch.compile`` first (the warm-up call pays for it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_edm2 import multigpu_impl, parse_common, peak_memory, sync

from edm2_diffusers import EDM2Pipeline
from edm2_diffusers.convert import from_multigpu
from edm2_diffusers.runs import scheduler_from_config
from edm2_diffusers.training import load_config


def reference_sampler(checkout: str, net: torch.nn.Module, reweight, sampling: dict, device):
    """edm2-multi-gpu's ``EDM`` around ``net`` with the config's sampling settings (``S_churn`` 0: deterministic)."""
    module = __import__("model.EDM", fromlist=["EDM"])
    edm = module.EDM(
        net,
        sigma_data=0.5,
        p_mean=-1.2,
        p_std=1.2,
        sigma_min=sampling["sigma_min"],
        sigma_max=sampling["sigma_max"],
        rho=sampling["rho"],
        S_min=0.0,
        S_max=float("inf"),
        S_noise=1.0,
        device=device,
    )
    edm.reweight_mlp = reweight
    return edm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10/E.yaml")
    parser.add_argument("--compare_multigpu", required=True, help="checkout of edm2-multi-gpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps (2N−1 network evaluations)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parse_common(parser, argv)

    device = torch.device(args.device)
    cfg = load_config(args.config)
    model_cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    model_cfg["dropout"] = 0.0
    if model_cfg["architecture"] not in ("C", "E"):
        parser.error("edm2-multi-gpu's sampler is compared on Config C or E")
    torch.manual_seed(0)
    ref = multigpu_impl(args.compare_multigpu, model_cfg, device)
    net, reweight = ref.module["net"].eval(), ref.module["reweight"]
    levels = len(model_cfg["channel_mult"])
    network = dict(
        image_shape=[model_cfg["in_channels"], model_cfg["sample_size"], model_cfg["sample_size"]],
        n_channels=model_cfg["model_channels"],
        ch_mults=list(model_cfg["channel_mult"]),
        is_attn=[(model_cfg["sample_size"] >> i) in model_cfg["attn_resolutions"] for i in range(levels)],
        dropout=0.0,
        n_blocks=model_cfg["num_blocks"] + 1,
    )
    state = {f"nn_model.{k}": v for k, v in net.state_dict().items()}
    state.update({f"reweight_mlp.{k}": v for k, v in reweight.state_dict().items()})
    unet = from_multigpu(state, network, model_cfg["architecture"]).to(device).eval()
    edm = reference_sampler(args.compare_multigpu, net, reweight, cfg["sampling"], device)
    if not cfg["sampling"].get("clip_sample"):
        parser.error("edm2-multi-gpu's sampler clips D to [-1, 1]: compare with a config whose sampling.clip_sample")
    if args.compile:
        unet.forward = torch.compile(unet.forward)
        edm.nn_model = torch.compile(net)
    pipe = EDM2Pipeline(unet=unet, scheduler=scheduler_from_config(cfg)).to(device)
    pipe.set_progress_bar_config(disable=True)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    amp = (lambda: torch.autocast(device.type, dtype=low)) if low else contextlib.nullcontext
    size = tuple(network["image_shape"])

    def ours():
        with torch.no_grad(), amp():
            out = pipe(batch_size=args.batch_size, num_inference_steps=args.steps, output_type="pt").images
        sync(device)
        return out

    def theirs():
        with torch.no_grad(), amp():
            out = edm.edm_sample(args.batch_size, size, steps=args.steps, notqdm=True)
        sync(device)
        return out

    samplers = {"edm2-diffusers EDM2Pipeline": ours, "edm2-multi-gpu edm_sample": theirs}
    best, mem, first = {}, {}, {}
    for name, fn in samplers.items():  # warm-up (compilation), peak memory of one call
        with peak_memory(device) as m:
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
        mem[name] = m["peak"] / 2**20
        print(f"{name}: first call {first[name]:.1f} s", file=sys.stderr)
        best[name] = math.inf
    for _ in range(args.rounds):
        for name, fn in samplers.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    info = dict(
        config=args.config,
        batch_size=args.batch_size,
        steps=args.steps,
        network_evaluations=2 * args.steps - 1,
        precision=args.precision,
        compile=args.compile,
        rounds=args.rounds,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        threads=torch.get_num_threads(),
        note=args.note,
    )
    results = [
        dict(
            name=name,
            img_s=args.batch_size / best[name],
            best_seconds=best[name],
            first_call_seconds=first[name],
            peak_mem_mb=mem[name],
        )
        for name in samplers
    ]
    ratio = results[0]["img_s"] / results[1]["img_s"]
    print(json.dumps(info))
    for row in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    print(json.dumps({"sampling_ratio": round(ratio, 3)}))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results, "sampling_ratio": ratio}, indent=1))
    return results


if __name__ == "__main__":
    main()
