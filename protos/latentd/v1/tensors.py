"""numpy arrays <-> `latentd.v1.Tensor` messages (raw little-endian bytes + dtype + shape), without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latentd.v1 import latentd_pb2 as pb


class TensorError(ValueError):
    """A tensor message that does not describe a valid array; `field` names it in the request."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class WireDType:
    """One wire dtype: its proto enum value, name, and how numpy holds it."""

    proto: int
    name: str
    numpy: str  # the little-endian numpy dtype of the bytes on the wire
    itemsize: int


# The one table of wire dtypes. bfloat16 travels as its 16 raw bits; numpy has no bfloat16, so it is
# widened to float32 on arrival and rounded (to nearest even) on departure.
DTYPES: tuple[WireDType, ...] = (
    WireDType(pb.UINT8, "uint8", "|u1", 1),
    WireDType(pb.FLOAT16, "float16", "<f2", 2),
    WireDType(pb.BFLOAT16, "bfloat16", "<u2", 2),
    WireDType(pb.FLOAT32, "float32", "<f4", 4),
    WireDType(pb.INT32, "int32", "<i4", 4),
)
# The dtypes latents may travel in (uint8 is for pixels only, int32 for a VQ model's codebook indices).
LATENT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
_BY_PROTO = {d.proto: d for d in DTYPES}
MAX_DIMS = 8  # latentd's tensors have 3 or 4 (numpy stops at 64)
_BY_NAME = {d.name: d for d in DTYPES}


def wire_dtype(name_or_proto: str | int) -> WireDType:
    table = _BY_NAME if isinstance(name_or_proto, str) else _BY_PROTO
    if name_or_proto not in table:
        known = ", ".join(d.name for d in DTYPES)
        raise TensorError(f"unknown dtype {name_or_proto!r} (known: {known})", "dtype")
    return table[name_or_proto]


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even
    rounded = np.where(np.isnan(values), bits | 0x00400000, rounded)  # keep NaN a (quiet) NaN
    return (rounded >> 16).astype("<u2")


def to_tensor(array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    """An array as a Tensor message, converted to `dtype` (default: the array's own)."""
    array = np.asarray(array)
    target = wire_dtype(dtype or array.dtype.name)
    if target.name == "bfloat16":
        raw = _to_bfloat16_bits(array.astype(np.float32))
    else:
        raw = np.ascontiguousarray(array, dtype=target.numpy)
    return pb.Tensor(dtype=target.proto, shape=list(array.shape), data=raw.tobytes())


def tensor_shape(message: pb.Tensor, field: str) -> tuple[int, ...]:
    """The shape of a Tensor message, checked before anything is sized or read from it: a known dtype, at
    most MAX_DIMS dimensions, none negative, no larger than any array can be; TensorError names `field`."""
    if message.dtype == pb.DTYPE_UNSPECIFIED:
        raise TensorError(f"{field}.dtype is not set", f"{field}.dtype")
    if message.dtype not in _BY_PROTO:
        raise TensorError(f"{field}.dtype {message.dtype} is not a known dtype", f"{field}.dtype")
    wire = _BY_PROTO[message.dtype]
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{field}.shape has {len(shape)} dimensions; at most {MAX_DIMS}", f"{field}.shape")
    if not shape or any(n < 0 for n in shape):
        raise TensorError(f"{field}.shape {list(shape)} must be non-empty and non-negative", f"{field}.shape")
    # An empty tensor's other dimensions are not bounded by its data; no array can span more bytes.
    if math.prod(n for n in shape if n) * wire.itemsize > np.iinfo(np.intp).max:
        raise TensorError(f"{field}.shape {list(shape)} is larger than any array", f"{field}.shape")
    return shape


def from_tensor(message: pb.Tensor, field: str) -> np.ndarray:
    """A Tensor message as a numpy array (bfloat16 widened to float32); TensorError names `field`."""
    shape = tensor_shape(message, field)
    wire = _BY_PROTO[message.dtype]
    expected = math.prod(shape) * wire.itemsize
    if len(message.data) != expected:
        raise TensorError(f"{field}.data has {len(message.data)} bytes; shape {list(shape)} of {wire.name} "
                          f"needs {expected}", f"{field}.data")
    array = np.frombuffer(message.data, dtype=wire.numpy).reshape(shape)
    if wire.name == "bfloat16":
        return (array.astype("<u4") << 16).view("<f4").astype(np.float32)
    # A writable array in native byte order (frombuffer's view of the message is read-only).
    return array.astype(array.dtype.newbyteorder("="), copy=True)
