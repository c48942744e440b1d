"""Throughput, memory and FLOP/s of EDM2UNet2DModel, optionally side by side with the reference implementations.

Examples::

    python benchmarks/benchmark_edm2.py --config configs/cifar10/E.yaml --batch_size 8
    python benchmarks/benchmark_edm2.py --config configs/cifar10/E.yaml --compare_multigpu /path/to/edm2-multi-gpu
    python benchmarks/benchmark_edm2.py --config configs/cifar10/G.yaml --compare_official /path/to/edm2
    python benchmarks/benchmark_edm2.py --posthoc_ema --snapshots 4,8,16

Reported per implementation: training step (forward + backward + Adam on the EDM2 loss) and eval forward in
images/s, sampling images/s for ``--sampling_steps`` Heun steps (2N−1 forwards), peak memory, and achieved FLOP/s
against the measured dense-matmul peak of the device. ``--compare_*`` takes a checkout of a reference repository;
its networks are imported from there at run time and get the same sizes, weights-independent workload and timer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.edm import denoise, edm_precondition, loss_weight

# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers.


def timeit(fn, min_run_time: float) -> float:
    """Median seconds per call of ``fn`` (torch.utils.benchmark, after one warm-up call)."""
    fn()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_matmul_flops(device, dtype, n: int = 2048, min_run_time: float = 1.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def mm():
        torch.mm(a, b)
        sync(device)

    return 2 * n**3 / timeit(mm, min_run_time)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict that receives the peak memory (bytes) used inside the block."""
    out = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
    else:  # resident set size sampled every millisecond, above its value on entry
        base, peak, done = _rss(), [0], threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                done.wait(0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        yield out
        done.set()
        thread.join()
        out["peak"] = max(peak[0], _rss()) - base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# Workloads shared by every implementation: the EDM2 loss around a denoiser returning (D, u).


def edm2_loss(denoise_fn, y, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    sigma = (torch.randn(y.shape[0], device=y.device) * P_std + P_mean).exp()
    D, logvar = denoise_fn(y + torch.randn_like(y) * sigma.view(-1, 1, 1, 1), sigma)
    w = loss_weight(sigma, sigma_data).view(-1, 1, 1, 1)
    return ((w / logvar.exp().view(-1, 1, 1, 1)) * (D - y) ** 2 + logvar.view(-1, 1, 1, 1)).mean()


class Impl:
    """One implementation under test: a module, its denoiser (D, u) and its F-only eval forward.

    ``eager`` is the uncompiled twin used to count FLOPs (compiled code is invisible to the FLOP counter).
    """

    def __init__(self, name, module, denoise_fn, forward_fn, eager=None):
        self.name, self.module, self.denoise_fn, self.forward_fn = name, module, denoise_fn, forward_fn
        self.eager = eager or self


def ours(model_cfg, device, dtype, compile_mode=None, channels_last=False):
    model = EDM2UNet2DModel(**model_cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model

    def fns(network):
        def den(x, sigma):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return denoise(network, x, sigma, return_logvar=True)

        def fwd(x, c_noise):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return network(x, c_noise).sample

        return den, fwd

    name = "edm2-diffusers" + (" +compile" if compile_mode else "") + (" +channels_last" if channels_last else "")
    eager = Impl(name, model, *fns(model))
    return Impl(name, model, *fns(net), eager=eager) if compile_mode else eager


def multigpu_impl(checkout, model_cfg, device):
    """edm2-multi-gpu's UNetC / UNetE / UNetG (``src/edm2multigpu/model``) with the same sizes."""
    sys.path.insert(0, str(Path(checkout) / "src" / "edm2multigpu"))
    arch = model_cfg["architecture"]
    module = __import__(f"model.unet{arch}", fromlist=[f"UNet{arch}"])
    attn = set(model_cfg["attn_resolutions"])
    levels = len(model_cfg["channel_mult"])
    net = getattr(module, f"UNet{arch}")(
        image_shape=[model_cfg["in_channels"], model_cfg["sample_size"], model_cfg["sample_size"]],
        n_channels=model_cfg["model_channels"],
        ch_mults=list(model_cfg["channel_mult"]),
        is_attn=[(model_cfg["sample_size"] >> i) in attn for i in range(levels)],
        dropout=model_cfg.get("dropout", 0.0),
        n_blocks=model_cfg["num_blocks"] + 1,
        **({"attn_channels_per_head": model_cfg.get("channels_per_head")} if arch == "G" else {}),
    ).to(device)
    reweight = net.get_reweighting().to(device)
    wrapper = torch.nn.ModuleDict({"net": net, "reweight": reweight})

    def den(x, sigma):
        c = edm_precondition(sigma)
        v = (-1, 1, 1, 1)
        F = net(c.c_in.view(v) * x, c.c_noise)
        return c.c_skip.view(v) * x + c.c_out.view(v) * F, reweight(c.c_noise).reshape(-1)

    return Impl("edm2-multi-gpu", wrapper, den, lambda x, c_noise: net(x, c_noise))


def official_impl(checkout, model_cfg, device):
    """NVIDIA's EDM2 ``Precond`` (``training/networks_edm2.py``) with the same sizes (Config G)."""
    sys.path.insert(0, str(Path(checkout)))
    from training.networks_edm2 import Precond

    from edm2_diffusers.convert import config_to_official

    with torch.device("meta"):
        kwargs = config_to_official(EDM2UNet2DModel(**model_cfg))
    if kwargs["channels_per_head"] is None:  # one head: as wide as the attention layers
        widths = [
            model_cfg["model_channels"] * m
            for i, m in enumerate(model_cfg["channel_mult"])
            if (model_cfg["sample_size"] >> i) in kwargs["attn_resolutions"]
        ]
        kwargs["channels_per_head"] = max(widths + [model_cfg["model_channels"] * model_cfg["channel_mult"][-1]])
    net = Precond(use_fp16=False, **kwargs).to(device)

    def den(x, sigma):
        D, logvar = net(x, sigma, return_logvar=True)
        return D, logvar.reshape(-1)

    return Impl("NVIDIA EDM2", net, den, lambda x, c_noise: net.unet(x, c_noise, None))


# ----------------------------------------------------------------------------------------------------------------


class Workload:
    """Training step and eval forward of one implementation on fixed inputs."""

    def __init__(self, impl: Impl, model_cfg, args, device):
        torch.manual_seed(0)
        n, c, r = args.batch_size, model_cfg["in_channels"], model_cfg["sample_size"]
        self.impl, self.n, self.device = impl, n, device
        self.y = torch.randn(n, c, r, r, device=device)
        self.x_in, self.c_noise = torch.randn(n, c, r, r, device=device), torch.full((n,), 0.3, device=device)
        low = torch.bfloat16 if args.precision == "bf16" else torch.float16
        self.amp = lambda: (
            torch.autocast(device.type, dtype=low) if args.precision != "fp32" else contextlib.nullcontext()
        )
        self.opt = torch.optim.Adam(impl.module.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

    def train_step(self, impl=None):
        impl = impl or self.impl
        impl.module.train()
        with self.amp():
            loss = edm2_loss(impl.denoise_fn, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)

    def eval_forward(self, impl=None):
        impl = impl or self.impl
        impl.module.eval()
        with torch.no_grad(), self.amp():
            impl.forward_fn(self.x_in, self.c_noise)
        sync(self.device)


def bench_all(impls, model_cfg, args, device, peak_flops):
    """Times every implementation in interleaved rounds and keeps each one's best round.

    Interleaving makes the comparison fair when other load comes and goes on the machine.
    """
    loads = [Workload(impl, model_cfg, args, device) for impl in impls]
    best = {(i, kind): math.inf for i in range(len(loads)) for kind in ("train", "eval")}
    mem = {}
    for i, load in enumerate(loads):  # warm-up (and compilation), memory high-water marks
        with peak_memory(device) as m:
            load.train_step()
            load.train_step()
        mem[(i, "train")] = m["peak"]
        with peak_memory(device) as m:
            load.eval_forward()
            load.eval_forward()
        mem[(i, "eval")] = m["peak"]
    deadline = time.perf_counter() + args.min_run_time * len(loads)
    rounds = 0
    while rounds < args.min_rounds or (time.perf_counter() < deadline and rounds < args.max_rounds):
        for i, load in enumerate(loads):
            for kind, fn in (("train", load.train_step), ("eval", load.eval_forward)):
                timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                best[(i, kind)] = min(best[(i, kind)], timer.timeit(1).mean)
        rounds += 1
    results = []
    for i, load in enumerate(loads):
        train_flops = count_flops(lambda load=load: load.train_step(load.impl.eager))
        eval_flops = count_flops(lambda load=load: load.eval_forward(load.impl.eager))
        t_train, t_eval = best[(i, "train")], best[(i, "eval")]
        results.append(
            dict(
                name=load.impl.name,
                rounds=rounds,
                train_img_s=load.n / t_train,
                eval_img_s=load.n / t_eval,
                # Heun sampling costs 2N−1 forwards per image; derived from the eval forward time.
                sampling_img_s=load.n / (t_eval * (2 * args.sampling_steps - 1)),
                train_gflop_s=train_flops / t_train / 1e9,
                eval_gflop_s=eval_flops / t_eval / 1e9,
                train_peak_frac=train_flops / t_train / peak_flops,
                eval_peak_frac=eval_flops / t_eval / peak_flops,
                train_peak_mem_mb=mem[(i, "train")] / 2**20,
                eval_peak_mem_mb=mem[(i, "eval")] / 2**20,
            )
        )
    return results


def bench_posthoc_ema(args, model_cfg):
    """Post-hoc EMA reconstruction: time and peak memory against the number of snapshots.

    Peak memory is the resident-set growth during ``reconstruct`` in model sizes (fp32 parameters and buffers);
    the bound to meet is (number of outputs + 2).
    """
    from edm2_diffusers.ema import PowerFunctionEMA, reconstruct

    rows = []
    for count in [int(s) for s in args.snapshots.split(",")]:
        with tempfile.TemporaryDirectory() as run_dir:
            model = EDM2UNet2DModel(**model_cfg)
            ema = PowerFunctionEMA(model, stds=(0.05, 0.10))
            for step in range(1, count + 1):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p), alpha=1e-3)
                ema.update(cur_nimg=step * 8, batch_size=8)
                ema.save_snapshots(run_dir, step=step, nimg=step * 8)
            model_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
            del model, ema
            with peak_memory(torch.device("cpu")) as mem:
                start = time.perf_counter()
                outputs = list(reconstruct(run_dir, stds=args.ema_stds))
                elapsed = time.perf_counter() - start
            rows.append(
                dict(
                    snapshots=count * 2,
                    outputs=len(outputs),
                    seconds=round(elapsed, 3),
                    seconds_per_snapshot=round(elapsed / (count * 2), 4),
                    peak_model_sizes=round(mem["peak"] / model_bytes, 2),
                    bound_model_sizes=len(outputs) + 2,
                )
            )
            del outputs
            print(json.dumps(rows[-1]))
    return rows


def parse_common(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add the options every benchmark script shares (threads, note, JSON output), parse, set the threads."""
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--note", help="a remark stored with the results (e.g. the machine's load)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10/E.yaml")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sampling_steps", type=int, default=18)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min_run_time", type=float, default=3.0, help="seconds of timing per implementation")
    parser.add_argument("--min_rounds", type=int, default=3, help="interleaved timing rounds, at least")
    parser.add_argument("--max_rounds", type=int, default=50)
    parser.add_argument("--compile", nargs="?", const="default", default=None, help="torch.compile mode for ours")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="with --compile: inductor freezing for inference graphs (weights folded and prepacked as constants)",
    )
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compare_multigpu", help="checkout of edm2-multi-gpu (Config C/E, and its G variant)")
    parser.add_argument("--compare_official", help="checkout of NVIDIA's EDM2 (Config G)")
    parser.add_argument("--posthoc_ema", action="store_true", help="time post-hoc EMA reconstruction instead")
    parser.add_argument("--snapshots", default="4,8,16")
    parser.add_argument("--ema_stds", type=lambda s: [float(v) for v in s.split(",")], default=[0.05, 0.1, 0.15])
    args = parse_common(parser, argv)

    model_cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    model_cfg["dropout"] = 0.0  # dropout changes nothing in cost but makes runs differ
    if args.compare_official:  # NVIDIA's G (a config may hold edm2-multi-gpu's variant, which has no official twin)
        model_cfg.update(pixel_norm="edm2", mid_flavor="dec", emb_gain_init=0.0)  # the same cost
    device = torch.device(args.device)
    if args.freeze:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    if args.posthoc_ema:
        rows = bench_posthoc_ema(args, model_cfg)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows

    peak_dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else torch.float32
    peak = peak_matmul_flops(device, peak_dtype)
    info = dict(
        config=args.config,
        batch_size=args.batch_size,
        precision=args.precision,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        threads=torch.get_num_threads(),
        matmul_peak_gflop_s=peak / 1e9,
        model_overrides={k: model_cfg[k] for k in ("pixel_norm", "mid_flavor", "emb_gain_init") if k in model_cfg}
        if args.compare_official
        else None,
        note=args.note,
    )
    print(json.dumps(info))
    impls = []
    if args.compare_multigpu:
        if model_cfg["architecture"] == "G" and model_cfg.get("pixel_norm") != "rms":
            parser.error("--compare_multigpu with Config G needs edm2-multi-gpu's variant (configs/cifar10/G.yaml)")
        impls.append(multigpu_impl(args.compare_multigpu, model_cfg, device))
    if args.compare_official:
        if model_cfg["architecture"] != "G":
            parser.error("--compare_official needs a Config G config")
        impls.append(official_impl(args.compare_official, model_cfg, device))
    impls.append(ours(model_cfg, device, args.precision, args.compile, args.channels_last))

    results = bench_all(impls, model_cfg, args, device, peak)
    for row in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if len(results) > 1:
        ref, mine = results[0], results[-1]
        ratios = {
            "train_step_ratio": mine["train_img_s"] / ref["train_img_s"],
            "eval_forward_ratio": mine["eval_img_s"] / ref["eval_img_s"],
        }
        print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))
        results.append(ratios)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
