"""The restricted unpickler: official EDM2 network pickles load as inert data, nothing stored in them runs, and files
that would exhaust memory or the stack are refused by name.

The pickles are written by the tests themselves (see ``official_pickles.py``) or assembled opcode by opcode.
"""

import io
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from official_pickles import (
    EDM2Loss,
    Payload,
    build_precond,
    dump_official,
    embedded_source,
    golden,
    imitation_modules,
    snapshot,
)
from torch import nn

from edm2_diffusers.convert.official_network import load_official_network
from edm2_diffusers.convert.safe_unpickler import MAX_NESTING, UnsafePickleError, load_official_pickle


def test_tensor_geometry_and_dtypes_survive():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),
        "offset_slice": base[1:, 2:5],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "bf16": base.to(torch.bfloat16),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "param": nn.Parameter(torch.randn(2, 3)),
    }
    loaded = load_official_pickle(io.BytesIO(dump_official(tensors)))
    for name, ref in tensors.items():
        assert type(loaded[name]) is torch.Tensor and loaded[name].dtype == ref.dtype, name
        assert torch.equal(loaded[name], ref.detach()), name


# ---------------------------------------------------------------------------------------------------------------------
# Nothing in the pickle runs.


def _payloads(marker: Path):
    touch = "touch " + shlex.quote(str(marker))
    return {
        "os.system": (Payload(os.system, touch), f"{os.system.__module__}.system"),
        "builtins.eval": (Payload(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "subprocess.call": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "builtins.exec": (Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call", "builtins.exec"])
def test_command_payloads_are_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "payload-ran"
    payload, global_name = _payloads(marker)[kind]
    blob = pickle.dumps({"ema": payload})
    pickle.loads(blob)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafePickleError, match=f"'{global_name}'") as err:
        load_official_pickle(io.BytesIO(blob))
    assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, ValueError)
    assert not marker.exists()

    # The same payload hidden deep inside an otherwise valid network.
    config, state, _ = golden()
    net = build_precond(state, config)
    net.unet.enc["8x8_block1"].clip_act = payload
    with pytest.raises(UnsafePickleError, match=f"'{global_name}'"):
        load_official_pickle(io.BytesIO(dump_official(snapshot(net))))
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    config, state, _ = golden()
    marker = tmp_path / "embedded-source-ran"
    blob = dump_official(snapshot(build_precond(state, config)), embedded_source(marker))
    with imitation_modules():  # the real mechanism executes the source: the file is dangerous
        assert type(pickle.loads(blob)["ema"]).__name__ == "Precond"
    assert marker.exists() and Path(f"{marker}.system").exists()
    marker.unlink()
    Path(f"{marker}.system").unlink()

    network = load_official_network(io.BytesIO(blob))
    assert network.state_dict.keys() == state.keys()
    assert not marker.exists() and not Path(f"{marker}.system").exists()


def test_malicious_source_of_a_persistent_object_stays_text(tmp_path):
    marker = tmp_path / "malicious-source-ran"
    source = f"import os\nos.system({'touch ' + shlex.quote(str(marker))!r})\nclass EDM2Loss: pass\n"
    data = load_official_pickle(io.BytesIO(dump_official({"loss_fn": EDM2Loss()}, source)))
    assert data["loss_fn"].module_src == source and data["loss_fn"].attributes["P_std"] == 1.6
    assert not marker.exists()


def _legacy_storage_bytes(main: bytes) -> bytes:
    """Bytes in the layout of torch's legacy storage format, with ``main`` as its main record."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}})
    return head + main + pickle.dumps([])


class LoadFromBytes:
    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


@pytest.mark.parametrize(
    "blob, refused",
    [
        # Payloads through other opcodes and look-alike names next to the allowed ones.
        (b"(S'echo pwned'\nios\nsystem\n.", "os.system"),  # INST, protocol 0
        (b"cposix\nsystem\n(S'echo pwned'\ntR.", "posix.system"),  # GLOBAL + REDUCE, protocol 0
        (pickle.dumps(Payload(torch.load, "x.pt")), "torch.serialization.load"),
        (pickle.dumps(Payload(torch._utils._rebuild_tensor, None, 0, (1,), (1,))), "torch._utils._rebuild_tensor'"),
        (pickle.dumps(Payload(nn.Sequential)), "torch.nn.modules.container.Sequential"),
        # A command hidden inside a tensor storage's bytes.
        (pickle.dumps(LoadFromBytes(_legacy_storage_bytes(pickle.dumps(Payload(os.system, "echo pwned"))))), "system"),
        # A numpy object array (its elements are pickled objects).
        (pickle.dumps(np.array([1, "a"], dtype=object)), "numpy dtype 'O8'"),
    ],
    ids=["inst", "global-reduce", "torch.load", "rebuild_tensor_v1", "sequential", "inside-storage", "object-array"],
)
def test_other_refusals(blob, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")):
        load_official_pickle(io.BytesIO(blob))


def test_lookalike_persistence_function_is_refused():
    with imitation_modules():
        persistence = sys.modules["torch_utils.persistence"]
        persistence._src_to_module = lambda src: None
        persistence._src_to_module.__module__ = "torch_utils.persistence"
        persistence._src_to_module.__qualname__ = "_src_to_module"
        blob = pickle.dumps(Payload(persistence._src_to_module, "import os"))
    with pytest.raises(UnsafePickleError, match=r"'torch_utils\.persistence\._src_to_module'"):
        load_official_pickle(io.BytesIO(blob))


# ---------------------------------------------------------------------------------------------------------------------
# Nor can a file exhaust memory or the stack: each refusal is named, names the file, and comes before the allocation.

_GIB = 1 << 30


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _storage_blob(numel: int, data: bytes) -> bytes:
    """A torch legacy-format storage whose record declares ``numel`` float32 elements and holds ``data``."""
    main = (  # ('storage', torch.FloatStorage, '0', 'cpu', numel, None) as a persistent id, protocol 2
        b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        + pickle.dumps(numel, protocol=2)[2:-1]
        + b"NtQ."
    )
    head = pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}})
    return head + main + pickle.dumps(["0"]) + struct.pack("<q", numel) + data


def _refused_before_allocating(path, match: str) -> str:
    """Load ``path``, expect :class:`UnsafePickleError` matching ``match``, and return its message; the load may
    allocate no more than 16 MiB of Python memory on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(UnsafePickleError, match=match) as err:
            load_official_pickle(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "blob, declared",
    [
        (b"\x80\x04\x8e" + _u64(_GIB) + b"abc", "a BINBYTES8 at byte 2 declares 1073741824 bytes but only 3 follow"),
        (b"\x80\x04\x8d" + _u64(_GIB) + b"abc", "a BINUNICODE8 at byte 2 declares 1073741824 bytes"),
        (b"\x80\x05\x96" + _u64(_GIB) + b"abc", "a BYTEARRAY8 at byte 2 declares 1073741824 bytes"),
        (b"\x80\x03B" + struct.pack("<I", _GIB) + b"abc.", "a BINBYTES at byte 2 declares 1073741824 bytes"),
        (b"\x80\x04\x95" + _u64(_GIB) + b"N.", "a frame declares 1073741824 bytes but only 2 follow"),
        (b"\x80\x02Nr" + struct.pack("<I", 1 << 24) + b".", "memo slot 16777216 skips ahead of the 0 stored"),
        (pickle.dumps(LoadFromBytes(_storage_blob(1 << 40, b"\0" * 4))), "declares 1099511627776 elements"),
        (pickle.dumps(LoadFromBytes(b"\x80\x04\x8e" + _u64(_GIB) + b"abc")), "a tensor storage: a BINBYTES8"),
    ],
    ids=["binbytes8", "binunicode8", "bytearray8", "binbytes", "frame", "memo", "storage-size", "inside-storage"],
)
def test_declared_sizes_beyond_the_data_are_refused_before_allocating(tmp_path, blob, declared):
    path = tmp_path / "huge.pkl"
    path.write_bytes(blob)
    _refused_before_allocating(path, re.escape(declared))


def test_tensor_reaching_beyond_its_storage_is_refused(tmp_path):
    path = tmp_path / "stride0.pkl"
    path.write_bytes(dump_official({"ema": torch.zeros(1).expand(1 << 40)}))  # 4 TiB of float32 over 4 bytes
    message = _refused_before_allocating(path, "reaches beyond its storage of 1 elements")
    assert "size (1099511627776,), stride (0,)" in message
    storage = LoadFromBytes(_storage_blob(6, bytes(24)))
    for blob in (
        dump_official({"t": torch.zeros(2, 3)[:, :1].expand(2, 7)}),  # 14 elements over 6
        pickle.dumps(Payload(torch._utils._rebuild_tensor_v2, storage, 4, (2,), (3,), False, None)),  # ends at 7
    ):
        with pytest.raises(UnsafePickleError, match="reaches beyond its storage of 6 elements"):
            load_official_pickle(io.BytesIO(blob))
    broadcast = load_official_pickle(io.BytesIO(dump_official({"t": torch.arange(6.0)[2:3].expand(4)})))["t"]
    assert torch.equal(broadcast, torch.full((4,), 2.0))  # a stride-0 view within its storage still loads


@pytest.mark.parametrize(
    "blob",
    [
        b"(" * 100_000 + b"l" * 100_000 + b".",  # lists in lists
        b"}" + b"(" * 100_000 + b"t" * 100_000 + b"K\x01s.",  # a dict keyed by tuples in tuples (hashing recurses)
    ],
    ids=["lists", "tuple-key"],
)
def test_deep_nesting_is_refused_by_name(tmp_path, blob):
    path = tmp_path / "deep.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="nests its data") as err:
        load_official_pickle(path)
    assert str(err.value).startswith(f"{path}: ")
    nested = [[]]
    for _ in range(MAX_NESTING - 3):
        nested = [nested]
    assert load_official_pickle(io.BytesIO(pickle.dumps(nested))) == nested  # up to the limit, data loads


def test_a_sub_module_placed_twice_is_refused():
    # 2**40 paths through 40 shared levels: flattening this tree's state dict would never end.
    node = nn.ModuleDict({"leaf": nn.ModuleDict()})
    for _ in range(40):
        node = nn.ModuleDict({"a": node, "b": node})
    with pytest.raises(UnsafePickleError, match="'ModuleDict' is placed twice"):
        load_official_pickle(io.BytesIO(dump_official({"ema": node})))
