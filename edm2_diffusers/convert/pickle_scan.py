"""A walk over one pickle stream's opcodes, before it is unpickled, that refuses what would exhaust memory.

CPython's unpickler allocates what a pickle declares before reading it: a ``BINBYTES8`` of 2**60 bytes, a frame of that
length or a memo slot numbered 4 billion fail with ``MemoryError`` (or, below the machine's limit, take that memory)
even when the file holds a few bytes. :func:`check_pickle_stream` reads the opcodes once, building nothing and seeking
over payloads, and raises :class:`UnsafePickleError` where a declared length runs past the bytes that follow or a memo
slot skips ahead of those stored so far (standard picklers number them in order).

The restricted unpickler (:mod:`.safe_unpickler`) runs it on the file and on every pickle inside a tensor storage. This
module imports nothing of the package.
"""

from __future__ import annotations

import io
import pickle
import pickletools

__all__ = ["UnsafePickleError", "check_pickle_stream"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something this loader does not rebuild: a global that could run code, or more memory or
    nesting than its own data can justify."""


_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
# Counted arguments: width and signedness of the length that precedes the payload.
_LENGTH_PREFIXES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _read_exactly(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{what}: the data ends before its STOP opcode (truncated)")
    return data


def _read_argument(f, op, end: int, what: str) -> bytes | None:
    """Read ``op``'s argument bytes, or skip a counted payload after checking that it lies inside the stream."""
    arg = op.arg
    if arg.n >= 0:
        return _read_exactly(f, arg.n, what)
    if arg.n == pickletools.UP_TO_NEWLINE:
        lines = [f.readline() for _ in range(2 if arg.name == "stringnl_noescape_pair" else 1)]
        if not all(line.endswith(b"\n") for line in lines):
            raise ValueError(f"{what}: the data ends inside a {op.name} argument (truncated)")
        return lines[0]
    width, signed = _LENGTH_PREFIXES[arg.n]
    declared = int.from_bytes(_read_exactly(f, width, what), "little", signed=signed)
    remaining = end - f.tell()
    if declared < 0 or declared > remaining:
        raise UnsafePickleError(
            f"{what}: a {op.name} at byte {f.tell() - width - 1} declares {declared} bytes but only {remaining} "
            "follow (a truncated or forged file); refusing to allocate it"
        )
    f.seek(declared, io.SEEK_CUR)
    return None


def _memo_index(op, arg: bytes | None, memo_len: int, what: str) -> int:
    if arg is None:  # MEMOIZE stores at the next free slot
        return memo_len
    if op.name != "PUT":
        return int.from_bytes(arg, "little")
    try:
        return int(arg)
    except ValueError as err:
        raise ValueError(f"{what}: a PUT opcode has no valid memo index") from err


def check_pickle_stream(f, end: int, what: str) -> None:
    """Walk one pickle from ``f``'s position to its STOP and refuse what would allocate memory the data cannot fill.

    ``f`` is a seekable binary stream of ``end`` bytes; its position is restored afterwards.
    """
    start, memo_len = f.tell(), 0
    try:
        while True:
            code = f.read(1)
            op = _OPCODES.get(code)
            if op is None:
                if not code:
                    raise ValueError(f"{what}: the data ends before its STOP opcode (truncated)")
                raise ValueError(f"{what}: byte {code!r} at offset {f.tell() - 1} is not a pickle opcode")
            if op.name == "STOP":
                return
            arg = _read_argument(f, op, end, what) if op.arg is not None else None
            if op.name == "FRAME" and int.from_bytes(arg, "little") > end - f.tell():
                raise UnsafePickleError(
                    f"{what}: a frame declares {int.from_bytes(arg, 'little')} bytes but only {end - f.tell()} "
                    "follow (a truncated or forged file); refusing to allocate it"
                )
            if op.name in _MEMO_PUTS or op.name == "MEMOIZE":
                index = _memo_index(op, arg, memo_len, what)
                if index > memo_len:
                    raise UnsafePickleError(
                        f"{what}: memo slot {index} skips ahead of the {memo_len} stored so far (a forged file); "
                        "refusing to allocate it"
                    )
                memo_len += index == memo_len
    finally:
        f.seek(start)
