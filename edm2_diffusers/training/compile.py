"""``torch.compile`` in training: the loss (the U-Net's forward inside it) and the sample grids' network.

The trainer compiles functions and wrappers, never the modules it owns: ``run.unet`` stays the plain
:class:`~edm2_diffusers.EDM2UNet2DModel` whose parameters the optimizer steps and the EMA tracks, so checkpoints and
exports carry no ``_orig_mod.`` prefixes and a compiled run resumes from an eager run's checkpoint and vice versa.
Accelerate's own dynamo setting (``accelerate config`` / ``accelerate launch --dynamo_backend``) turns compilation on
as well; the Accelerator itself is then told not to compile, since it would wrap the whole prepared module.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.logging import get_logger
from accelerate.utils import DynamoBackend, TorchDynamoPlugin
from torch._dynamo.utils import counters

logger = get_logger(__name__)

DEFAULT_BACKEND = "inductor"


def compile_options(train_cfg: dict) -> dict | None:
    """``torch.compile`` keyword arguments of a run, or ``None`` to train eagerly.

    ``training.torch_compile`` or Accelerate's dynamo backend (environment ``ACCELERATE_DYNAMO_*``, as ``accelerate
    launch`` sets it) turn compilation on. The backend is ``training.compile_backend``, else Accelerate's, else
    inductor; Accelerate's mode, fullgraph and dynamic settings come along when its backend is set.
    """
    plugin = TorchDynamoPlugin()  # reads Accelerate's environment
    from_accelerate = plugin.backend != DynamoBackend.NO
    if not (train_cfg["torch_compile"] or from_accelerate):
        return None
    options = plugin.to_kwargs() if from_accelerate else {"backend": DEFAULT_BACKEND}
    if train_cfg["compile_backend"]:
        options["backend"] = train_cfg["compile_backend"]
    return options


class CompileWatch:
    """Counts the graphs dynamo compiles during training steps and during sample grids.

    The first step (and the first grid) compiles; a graph compiled after it is a recompilation, which a run with
    fixed shapes should never see (:meth:`summary`).
    """

    def __init__(self):
        self.graphs: dict[str, list[int]] = {"training": [], "sampling": []}

    @contextlib.contextmanager
    def count(self, phase: str):
        before = counters["stats"]["unique_graphs"]
        try:
            yield
        finally:
            self.graphs[phase].append(counters["stats"]["unique_graphs"] - before)

    def summary(self) -> dict:
        """``{"training_graphs", "training_recompiles", "sampling_graphs", "sampling_recompiles"}``."""
        out = {}
        for phase, counts in self.graphs.items():
            out[f"{phase}_graphs"] = sum(counts[:1])
            out[f"{phase}_recompiles"] = sum(counts[1:])
        return out

    def report(self) -> dict:
        """Log :meth:`summary` (a warning when anything recompiled) and return it."""
        stats = self.summary()
        recompiles = stats["training_recompiles"] + stats["sampling_recompiles"]
        log = logger.warning if recompiles else logger.info
        log(
            "torch.compile: %d graphs for training, %d for sampling; %d recompilations after the first step or grid",
            stats["training_graphs"],
            stats["sampling_graphs"],
            recompiles,
        )
        return stats


def compiled_sampler(net: torch.nn.Module, options: dict | None, cache: dict) -> torch.nn.Module:
    """The sample grids' network, compiled once per module (``cache`` keeps the wrapper by module id)."""
    if options is None:
        return net
    if id(net) not in cache:
        cache[id(net)] = torch.compile(net, **options)
    return cache[id(net)]


__all__ = ["DEFAULT_BACKEND", "CompileWatch", "compile_options", "compiled_sampler"]
