"""Test helper: one process of a launched training run that records what every micro-step sees.

Run by ``accelerate launch`` as ``multinode_rank.py CONFIG OUTPUT_DIR RECORD_DIR OVERRIDES_JSON``; it trains
through the library with :func:`spy` around the loop's ``micro_batch`` and writes into RECORD_DIR
``draws<rank>.safetensors`` (the images after flips, σ and ε of every micro-step it ran, keyed ``step.micro.name``),
``weights<rank>.safetensors`` and ``info<rank>.json``. With ``STOP_AT_STEP=k`` in the environment it writes
``stopped<rank>`` once step k is done (its checkpoint written) and waits there to be killed. The tests import
:func:`spy` for one-process runs.
"""

import json
import os
import sys
import time

from safetensors.torch import save_file

from edm2_diffusers.training import load_config, loop, train


def spy(original, record: dict, stop_at: int | None = None, marker: str | None = None):
    """``micro_batch`` that keeps a copy of what it returns in ``record`` (and stops before step ``stop_at + 1``)."""

    def micro_batch(cfg, batch, standardizer, step, micro, world, rank):
        if stop_at is not None and step == stop_at:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(300)  # the test kills the process here
        images, sigma, noise = original(cfg, batch, standardizer, step, micro, world, rank)
        for name, value in (("images", images), ("sigma", sigma), ("noise", noise)):
            record[f"{step}.{micro}.{name}"] = value.detach().clone().contiguous()
        return images, sigma, noise

    return micro_batch


def main() -> None:
    config, out, records, overrides = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    os.makedirs(records, exist_ok=True)
    stop = os.environ.get("STOP_AT_STEP")
    record: dict = {}
    marker = os.path.join(records, f"stopped{rank}")
    loop.micro_batch = spy(loop.micro_batch, record, int(stop) if stop else None, marker)
    result = train(load_config(config, {"training.output_dir": out, **json.loads(overrides)}))
    save_file(record, os.path.join(records, f"draws{rank}.safetensors"))
    weights = {k: v.detach().contiguous() for k, v in result.unet.state_dict().items()}
    save_file(weights, os.path.join(records, f"weights{rank}.safetensors"))
    info = {"world": int(os.environ["WORLD_SIZE"]), "step": result.step, "images_seen": result.images_seen}
    info["has_ema"] = result.ema is not None
    with open(os.path.join(records, f"info{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
