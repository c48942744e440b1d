"""Honest rewinds and recorded resumes, on a real 30-step run.

A resume from `checkpoint-20` of a run that reached step 30 is refused without `--rewind`, naming what lies after
the checkpoint; with it, that branch moves into `abandoned-<time>/` (nothing deleted), `latest` cannot jump back,
pruning keeps the branch point, and the snapshots carry run and branch so that reconstruction never mixes two runs or
two trajectories. The settings a resume changes are recorded with their step and carried into the export.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training_loop import tiny_config, tree

from edm2_diffusers.ema import reconstruct
from edm2_diffusers.ema.snapshots import read_snapshot_info
from edm2_diffusers.training import load_config, resolve_resume, train

LR, NEW_LR = 1e-2, 5e-3


def config(tmp_path: Path, out: Path, **overrides):
    path = tiny_config(tmp_path, max_train_steps=30, checkpointing_steps=5, checkpoints_total_limit=3)
    cfg = load_config(path, {"training.output_dir": str(out), "training.learning_rate": LR, **overrides})
    cfg["ema"]["snapshot_every_steps"] = 5
    return cfg


@pytest.fixture(scope="module")
def reached_30(tmp_path_factory) -> Path:
    """A run of 30 steps: checkpoints every 5 (the last 3 kept), snapshots every 5, the export of step 30."""
    tmp = tmp_path_factory.mktemp("reached30")
    out = tmp / "run"
    train(config(tmp, out))
    return out


@pytest.fixture(scope="module")
def rewound(reached_30, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The run rewound to checkpoint-20 with a new learning rate and trained to 30 again: (run, abandoned, copy of
    the run before the rewind)."""
    tmp = tmp_path_factory.mktemp("rewound")
    before, out = tmp / "before", tmp / "run"
    shutil.copytree(reached_30, before)
    shutil.copytree(reached_30, out)
    train(
        config(
            tmp,
            out,
            **{
                "training.resume_from_checkpoint": str(out / "checkpoint-20"),
                "training.rewind": True,
                "training.learning_rate": NEW_LR,
            },
        )
    )
    (abandoned,) = out.glob("abandoned-*")
    return out, abandoned, before


def test_without_the_flag_a_rewind_is_refused_naming_what_lies_after_the_checkpoint(reached_30, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reached_30, out)
    before = tree(out)
    cfg = config(tmp_path, out, **{"training.resume_from_checkpoint": "checkpoint-20"})
    with pytest.raises(ValueError, match="--rewind") as err:
        train(cfg)
    message = str(err.value)
    assert "step 20" in message and "checkpoint-25" in message and "checkpoint-30" in message
    assert "EMA snapshots (phema-000000025" in message and "pipeline/ of step 30" in message
    assert tree(out) == before
    # `latest` (the newest checkpoint, nothing after it) needs no flag.
    assert resolve_resume("latest", str(out)) == str(out / "checkpoint-30")


def test_with_the_flag_the_abandoned_branch_is_moved_aside_whole_and_nothing_is_deleted(rewound):
    out, abandoned, before = rewound
    moved = tree(abandoned)
    for name in ("checkpoint-25", "checkpoint-30"):
        for file, digest in tree(before / name).items():
            assert moved[f"{name}/{file}"] == digest  # byte for byte what the abandoned branch wrote
    snapshots = [n for n in moved if n.startswith("phema/")]
    assert sorted({n.split("-")[1] for n in snapshots}) == ["000000025", "000000030"] and len(snapshots) == 4
    assert "pipeline/export_info.json" in moved
    assert json.loads((abandoned / "pipeline" / "export_info.json").read_text())["run"]["step"] == 30
    # The branch point and everything before it stay; pruning (limit 3) kept checkpoint-20.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-25", "checkpoint-30"]
    assert tree(out / "checkpoint-20") == tree(before / "checkpoint-20")
    for step in (5, 10, 15, 20):
        name = f"phema-{step:09d}-0.050.safetensors"
        assert tree(out / "phema")[name] == tree(before / "phema")[name]


def test_latest_cannot_jump_back_to_the_abandoned_trajectory(rewound):
    out, abandoned, _ = rewound
    assert resolve_resume("latest", str(out)) == str(out / "checkpoint-30")
    new = load_file(str(out / "checkpoint-30" / "model.safetensors"))
    old = load_file(str(abandoned / "checkpoint-30" / "model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in new)  # a different trajectory (the new learning rate)


def test_the_run_record_names_run_branches_and_the_resume_with_its_changed_setting(rewound):
    out, abandoned, before = rewound
    record = json.loads((out / "run.json").read_text())
    old_record = json.loads((before / "run.json").read_text())
    assert record["run_id"] == old_record["run_id"]
    (first,) = old_record["lineage"]
    assert [(b["branch"], b["from_step"]) for b in record["lineage"]][0] == (first["branch"], 0)
    assert record["lineage"][1]["from_step"] == 20 and record["lineage"][1]["branch"] != first["branch"]
    (rewind,) = record["rewinds"]
    assert rewind["step"] == 20 and rewind["moved_to"] == abandoned.name
    assert rewind["abandoned_branches"] == [first["branch"]]
    (resume,) = record["resumes"]
    assert resume["step"] == 20 and resume["checkpoint"] == "checkpoint-20"
    assert resume["overrides"] == {"training.learning_rate": {"from": LR, "to": NEW_LR}}
    # config.yaml holds the setting now in force; the old one is in the record.
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["learning_rate"] == NEW_LR
    assert yaml.safe_load((before / "config.yaml").read_text())["training"]["learning_rate"] == LR


def test_the_export_carries_the_history_and_the_card_shows_the_change(rewound):
    out, _, _ = rewound
    info = json.loads((out / "pipeline" / "export_info.json").read_text())
    history = info["run"]["history"]
    record = json.loads((out / "run.json").read_text())
    assert history["run_id"] == record["run_id"] and history["branch"] == record["lineage"][-1]["branch"]
    assert history["changed_on_resume"] == [
        {"step": 20, "overrides": {"training.learning_rate": {"from": LR, "to": NEW_LR}}}
    ]
    assert info["training"]["learning_rate"] == NEW_LR
    card = (out / "pipeline" / "README.md").read_text()
    assert "`training.learning_rate` from step 20 (resumed) | 0.01 → 0.005" in card


def test_snapshots_carry_run_and_branch(rewound):
    out, abandoned, _ = rewound
    record = json.loads((out / "run.json").read_text())
    first, second = (b["branch"] for b in record["lineage"])
    for step, branch in ((20, first), (25, second), (30, second)):
        info = read_snapshot_info(str(out / "phema" / f"phema-{step:09d}-0.050.safetensors"))
        assert (info.run_id, info.branch) == (record["run_id"], branch)
    info = read_snapshot_info(str(abandoned / "phema" / "phema-000000030-0.050.safetensors"))
    assert (info.run_id, info.branch, info.lineage) == (record["run_id"], first, [[first, 0]])


def mixed(tmp_path: Path, *sources: tuple[Path, list[int]]) -> Path:
    """A phema folder assembled from the snapshots of the given steps of each source folder."""
    folder = tmp_path / "mixed" / "phema"
    folder.mkdir(parents=True)
    for source, steps in sources:
        for step in steps:
            for path in source.glob(f"phema-{step:09d}-*.safetensors"):
                shutil.copy(path, folder / path.name)
    return folder.parent


def test_reconstruction_never_mixes_two_trajectories_of_one_run(rewound, tmp_path):
    out, abandoned, before = rewound
    # Each branch alone reconstructs; the abandoned one exactly as before the rewind.
    assert reconstruct(str(out), [0.07]).step == 30
    old_branch = mixed(tmp_path / "a", (out / "phema", [5, 10, 15, 20]), (abandoned / "phema", [25, 30]))
    again, original = reconstruct(str(old_branch), [0.07]), reconstruct(str(before), [0.07])
    for key, value in original.state_dicts[0].items():
        assert torch.equal(again.state_dicts[0][key], value), key
    # The new branch's step 30 over the old branch's step 25: two trajectories.
    crossed = mixed(tmp_path / "b", (out / "phema", [5, 10, 15, 20, 30]), (abandoned / "phema", [25]))
    with pytest.raises(ValueError, match="two trajectories of one run") as err:
        reconstruct(str(crossed), [0.07])
    assert "phema-000000025" in str(err.value)
    # Reconstructing at step 25 of that folder uses the old branch only, which is one trajectory.
    assert reconstruct(str(crossed), [0.07], step=25).step == 25


def test_reconstruction_never_mixes_two_runs_of_the_same_architecture(reached_30, tmp_path):
    other = tmp_path / "other"
    train(config(tmp_path, other, **{"training.max_train_steps": 5, "training.seed": 4}))
    folder = mixed(tmp_path, (reached_30 / "phema", [10, 15, 20]), (other / "phema", [5]))
    with pytest.raises(ValueError, match="snapshots of two runs are mixed"):
        reconstruct(str(folder), [0.07])
