"""EMA lengths as users write them: ``0.05``, ``"0.05,0.10"``, ``"0.02:0.20:0.02"`` (stop included) or ``"best"``."""

from __future__ import annotations

import math

from .power import MAX_STD

BEST = "best"


def _range(spec: str) -> list[float]:
    try:
        start, stop, step = (float(p) for p in spec.split(":"))
    except ValueError:
        raise ValueError(f"EMA stds {spec!r}: a range is start:stop:step, e.g. 0.02:0.20:0.02") from None
    if not step > 0:
        raise ValueError(f"the step of EMA stds {spec!r} must be positive")
    if stop < start:
        raise ValueError(f"EMA stds {spec!r} run backwards (stop < start)")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


def _item(item, allow_best: bool):
    if isinstance(item, str):
        item = item.strip()
        if item.lower() == BEST:
            if not allow_best:
                raise ValueError("'best' (the EMA sweep's best std) is not accepted here; give numbers")
            return BEST
        try:
            item = float(item)
        except ValueError:
            raise ValueError(f"EMA std {item!r} is not a number" + (" (or 'best')" if allow_best else "")) from None
    elif isinstance(item, bool) or not isinstance(item, (int, float)):
        raise ValueError(f"EMA std {item!r} is not a number")
    item = float(item)
    if not (math.isfinite(item) and 0 < item < MAX_STD):
        raise ValueError(
            f"EMA std {item!r} must lie in (0, {MAX_STD:.4f}), the range of power-function EMA profiles (Eq. 123)"
        )
    return item


def parse_stds(stds, allow_best: bool = False, sort: bool = False) -> list:
    """Normalize EMA stds: a number, a comma-separated string, a ``start:stop:step`` range, or a list of those.

    Args:
        stds: what the user gave.
        allow_best (`bool`): accept ``"best"`` (the EMA sweep's best std, resolved by the caller).
        sort (`bool`): return them sorted (else in the given order, the first one first).

    Returns:
        `list`: floats (and at most one ``"best"``) without duplicates.

    Raises:
        ValueError: naming the offending entry.
    """
    if stds is None:
        raise ValueError("give the EMA stds, e.g. 0.05,0.10" + (" or 'best'" if allow_best else ""))
    if isinstance(stds, str):
        items = _range(stds.strip()) if ":" in stds else [s for s in stds.split(",") if s.strip()]
    elif isinstance(stds, (list, tuple)):
        items = list(stds)
    else:
        items = [stds]
    out = list(dict.fromkeys(_item(item, allow_best) for item in items))
    if not out:
        raise ValueError(f"no EMA stds in {stds!r}")
    if sort:
        if BEST in out:
            raise ValueError("'best' cannot be sorted among numeric EMA stds")
        out.sort()
    return out


__all__ = ["BEST", "parse_stds"]
