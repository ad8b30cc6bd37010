"""Read a safetensors file in two steps: its header first (names, dtypes, shapes, where
each tensor lies), checked without reading any tensor, then only the tensors asked for.

>>> import tempfile, torch
>>> from safetensors.torch import save_file
>>> path = tempfile.mkdtemp() + "/w.safetensors"
>>> save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, path)
>>> with open(path, "rb") as f:
...     header = read_header(f, path)
...     tensors = read_tensors(f, header, ["a"])           # "b" is never read
>>> header["b"], sorted(tensors), tensors["a"].sum().item()
(Entry(dtype=torch.bfloat16, shape=(4,), start=24, end=32), ['a'], 6.0)

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`` and the tensors' bytes.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import torch

from ..errors import GraphFileError

__all__ = ["parse_json", "read_header", "read_tensors"]

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 100_000


class Entry(NamedTuple):
    """One tensor as the header declares it: ``[start, end)`` bytes after the header."""

    dtype: torch.dtype
    shape: tuple
    start: int
    end: int


def parse_json(data, where: str):
    """``json.loads`` that refuses duplicate keys and ``NaN``/``Infinity`` (not JSON).

    >>> parse_json('{"a": 1, "b": [2.5]}', "x.json")
    {'a': 1, 'b': [2.5]}
    >>> parse_json('{"a": 1, "a": 2}', "x.json")
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: x.json is not valid JSON (duplicate key 'a')
    """
    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key[:50]!r}")
            out[key] = value
        return out

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GraphFileError(f"{where} is not valid JSON ({str(e)[:200]})") from None


def _entry(name: str, entry, data_size: int, where: str) -> Entry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise GraphFileError(f"{where} cannot be read: the header entry of tensor {name[:50]!r} must have exactly "
                             "'dtype', 'shape' and 'data_offsets'")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise GraphFileError(f"{where}: tensor {name[:50]!r} has dtype {str(entry['dtype'])[:20]!r}; graph files "
                             f"hold {', '.join(DTYPES)} tensors")
    shape, offsets = entry["shape"], entry["data_offsets"]
    ints = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in shape + offsets))
    if not ints or len(shape) > 32 or math.prod(max(d, 1) for d in shape) >= 2**62 or (
            offsets[0] > offsets[1] or offsets[1] > data_size):
        raise GraphFileError(f"{where} cannot be read: tensor {name[:50]!r} has shape {str(shape)[:50]} and data "
                             f"offsets {str(offsets)[:50]}; the file holds {data_size} bytes of tensor data")
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != size:
        raise GraphFileError(f"{where} cannot be read: tensor {name[:50]!r} of shape {shape} ({entry['dtype']}) "
                             f"needs {size} bytes, its data offsets span {offsets[1] - offsets[0]}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def read_header(f, where: str) -> dict:
    """``{name: Entry}`` from the open file ``f`` (named ``where`` in errors); no tensor is read.

    >>> import io, struct
    >>> raw = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    >>> f = io.BytesIO(struct.pack("<Q", len(raw)) + raw + bytes(2))
    >>> read_header(f, "w.safetensors")     # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: w.safetensors: tensor 'x' has dtype 'F8_E4M3'; graph files hold F16, ...

    Refused with :class:`GraphFileError`: a header over 64 MiB or longer than the file,
    invalid JSON or duplicate names, more than 100,000 tensors, dtypes other than
    ``F16 BF16 F32 F64 I8 I16 I32 I64 U8 BOOL`` (float8 and the like), more than 32 dims,
    shapes whose bytes do not match their offsets, and offsets beyond the end of the file.
    """
    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
        raise GraphFileError(f"{where} cannot be read: {size} bytes, the first 8 declare a header of "
                             f"{n if n >= 0 else 'no'} bytes (at most {MAX_HEADER_BYTES}, within the file)")
    header = parse_json(f.read(n), f"{where} (its header)")
    if not isinstance(header, dict):
        raise GraphFileError(f"{where} cannot be read: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GraphFileError(f"{where} cannot be read: __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise GraphFileError(f"{where} declares {len(header)} tensors; a graph file holds at most {MAX_TENSORS}")
    return {name: _entry(name, entry, size - 8 - n, where) for name, entry in header.items()}


def read_tensors(f, header: dict, names) -> dict:
    """The tensors ``names`` (all in ``header``) read from the open file ``f``, nothing else.

    >>> import io, struct
    >>> raw = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    >>> f = io.BytesIO(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.5, -2.0))
    >>> read_tensors(f, {"x": Entry(torch.float32, (2,), 0, 8)}, ["x"])["x"].tolist()
    [1.5, -2.0]
    """
    f.seek(0)
    start = 8 + int.from_bytes(f.read(8), "little")
    out = {}
    for name in names:
        e = header[name]
        f.seek(start + e.start)
        data = bytearray(e.end - e.start)
        if f.readinto(data) != len(data):
            raise GraphFileError(f"tensor {name!r} cannot be read: the file ends before its last byte")
        flat = torch.frombuffer(data, dtype=e.dtype) if data else torch.empty(0, dtype=e.dtype)
        out[name] = flat.reshape(e.shape)
    return out
