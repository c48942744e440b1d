"""Power-function EMA during training, snapshots, and post-hoc EMA reconstruction (paper Section 3.1, Appendix C)."""

from .build import build_ema, check_ema_config
from .power import (
    MAX_STD,
    exp_to_std,
    power_function_beta,
    profile_inner_product,
    solve_posthoc_coefficients,
    std_to_exp,
)
from .reconstruct import PostHocEMAReconstruction, profile_folders, reconstruct
from .snapshots import SnapshotInfo, config_fingerprint, list_snapshots, load_snapshot, snapshot_filename
from .stds import parse_stds
from .trackers import PowerFunctionEMA
from .traditional import TraditionalEMA, TraditionalEMAWithPostHoc, ema_pytorch_decay

__all__ = [
    "MAX_STD",
    "PostHocEMAReconstruction",
    "PowerFunctionEMA",
    "SnapshotInfo",
    "TraditionalEMA",
    "TraditionalEMAWithPostHoc",
    "build_ema",
    "check_ema_config",
    "config_fingerprint",
    "ema_pytorch_decay",
    "exp_to_std",
    "list_snapshots",
    "load_snapshot",
    "parse_stds",
    "power_function_beta",
    "profile_folders",
    "profile_inner_product",
    "reconstruct",
    "snapshot_filename",
    "solve_posthoc_coefficients",
    "std_to_exp",
]
