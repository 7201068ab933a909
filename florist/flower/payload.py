"""Adapters on the wire: ``Adapter`` <-> Flower ``ArrayRecord`` + ``ConfigRecord``, checked on arrival.

One adapter travels as one ArrayRecord whose keys are ``<module>/A`` and ``<module>/B`` in sorted
module order (so both ends agree on the order and nothing depends on dict insertion), and one
ConfigRecord mapping each module to its LoRA scaling. Only the factors a method actually sends
are included (FFA sends B alone, A comes from the shared seed; FedSA-LoRA and RoLoRA send one
factor, the other is what the receiver already holds). Tensors go over the wire as
float32 by default, the dtype ``florist.comm`` counts.

Everything that arrives from another machine is untrusted: ``record_to_adapter`` accepts only
plain float arrays (Flower serialises them with ``np.save(allow_pickle=False)`` and we read them
back the same way), checks key names, 2-D shapes, rank agreement between A and B, expected
shapes, finiteness and positive scalings, and names the sender and module in every error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from florist.aggregation.base import Adapter, LoraFactors
from florist.errors import FloristError

FACTORS = ("A", "B")
ACCEPTED_DTYPES = ("float32", "float64", "float16")


class PayloadError(FloristError, ValueError):
    """A message whose arrays do not form a valid adapter."""


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"wire dtype must be a floating point torch dtype name, got {name!r}")
    return dtype


def adapter_to_record(
    adapter: Adapter, *, factors: Sequence[str] = FACTORS, wire_dtype: str = "float32"
) -> tuple[ArrayRecord, ConfigRecord]:
    """The arrays (only ``factors``) and the per-module scalings of ``adapter``."""
    if not set(factors) <= set(FACTORS) or not factors:
        raise ValueError(f"factors must be a non-empty subset of {FACTORS}, got {tuple(factors)}")
    dtype = _torch_dtype(wire_dtype)
    arrays = ArrayRecord()
    scalings = ConfigRecord()
    for name in sorted(adapter):
        f = adapter[name]
        for factor in FACTORS:  # fixed A-then-B order
            if factor in factors:
                tensor = getattr(f, factor).detach().to("cpu", dtype).contiguous()
                arrays[f"{name}/{factor}"] = Array(tensor.numpy())
        scalings[name] = float(f.scaling)
    return arrays, scalings


def record_nbytes(records: Iterable[ArrayRecord]) -> tuple[int, int]:
    """(parameters, bytes) of every array in ``records``: the tensors themselves (numel and numel x
    itemsize), without numpy's header."""
    arrays = [array for record in records for array in record.values()]
    numels = [int(math.prod(array.shape)) for array in arrays]
    return sum(numels), sum(n * np.dtype(array.dtype).itemsize for n, array in zip(numels, arrays))


def _decode(array: Array, where: str) -> torch.Tensor:
    # Look at the declared metadata before deserialising anything.
    if array.stype != "numpy.ndarray":
        raise PayloadError(f"{where}: unsupported serialisation {array.stype!r}")
    if array.dtype not in ACCEPTED_DTYPES:
        raise PayloadError(
            f"{where}: dtype {array.dtype!r} is not a float type ({', '.join(ACCEPTED_DTYPES)})"
        )
    if len(array.shape) != 2:
        raise PayloadError(f"{where}: expected a matrix, got shape {tuple(array.shape)}")
    try:
        ndarray = array.numpy()  # np.load(allow_pickle=False): never unpickles
    except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's fault
        raise PayloadError(f"{where}: cannot decode the array ({e})") from None
    if ndarray.shape != tuple(array.shape) or str(ndarray.dtype) != array.dtype:
        raise PayloadError(
            f"{where}: declared {array.dtype}{tuple(array.shape)} but holds {ndarray.dtype}{ndarray.shape}"
        )
    tensor = torch.from_numpy(np.array(ndarray, dtype=np.float32, copy=True))
    if not bool(torch.isfinite(tensor).all()):
        raise PayloadError(f"{where}: contains NaN or Inf")
    return tensor


def _filled(
    fill: Adapter | None, name: str, factor: str, rank: int, scaling: float, where: str
) -> torch.Tensor:
    """The receiver's own ``factor`` of ``name`` at ``rank``; B rescaled to ``scaling``."""
    held = (fill or {}).get(name)
    if held is None or held.rank < rank:
        raise PayloadError(
            f"{where}: no {factor} of rank {rank} held here for the factor that did not travel"
        )
    if factor == "A":
        return held.A[:rank].to(torch.float32).clone()
    ratio = float(held.scaling) / scaling
    src = held.B[:, :rank]
    return (src if ratio == 1.0 else src.to(torch.float64) * ratio).to(torch.float32).clone()


def record_to_adapter(
    arrays: ArrayRecord,
    scalings: Mapping[str, object],
    *,
    factors: Sequence[str] = FACTORS,
    frozen_A: Mapping[str, torch.Tensor] | None = None,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    sender: str = "message",
    fill: Adapter | None = None,
) -> Adapter:
    """Rebuild an ``Adapter`` from a received record, validating everything.

    With ``factors == ("B",)`` (FFA) each module's A is taken from ``frozen_A`` (its first r rows,
    r being the rank of the received B). Otherwise a factor that did not travel comes from
    ``fill``, what the receiver already holds (FedSA-LoRA's own B, RoLoRA's shared frozen factor),
    at the received rank, with B rescaled to the received scaling as ``LoraHost.install`` does.
    ``expected_shapes`` maps module -> (out, in).
    """
    factors = tuple(factors)
    if factors not in (("A", "B"), ("B",), ("A",)):
        raise ValueError(f"factors must be ('A', 'B'), ('A',) or ('B',), got {factors}")
    if factors != ("A", "B") and frozen_A is None and fill is None:
        raise ValueError(f"an adapter sent as {factors[0]} only needs the other factor (frozen A or fill)")
    modules = sorted(scalings)
    expected_keys = {f"{m}/{f}" for m in modules for f in factors}
    if set(arrays) != expected_keys:
        missing = sorted(expected_keys - set(arrays))[:3]
        extra = sorted(set(arrays) - expected_keys)[:3]
        raise PayloadError(
            f"{sender}: arrays do not match the modules (missing {missing}, unexpected {extra})"
        )
    if expected_shapes is not None and set(modules) != set(expected_shapes):
        missing = sorted(set(expected_shapes) - set(modules))[:3]
        extra = sorted(set(modules) - set(expected_shapes))[:3]
        raise PayloadError(
            f"{sender}: modules differ from the model's (missing {missing}, unexpected {extra})"
        )
    adapter: Adapter = {}
    for name in modules:
        where = f"{sender}, module {name!r}"
        scaling = scalings[name]
        if (
            isinstance(scaling, bool)
            or not isinstance(scaling, (int, float))
            or not math.isfinite(scaling)
            or scaling <= 0
        ):
            raise PayloadError(f"{where}: scaling must be a positive finite number, got {scaling!r}")
        B = _decode(arrays[f"{name}/B"], f"{where}, factor B") if "B" in factors else None
        if "A" in factors:
            A = _decode(arrays[f"{name}/A"], f"{where}, factor A")
        elif frozen_A is not None:
            assert B is not None
            if name not in frozen_A or frozen_A[name].shape[0] < B.shape[1]:
                raise PayloadError(f"{where}: no frozen A of rank {B.shape[1]} for this module")
            A = frozen_A[name][: B.shape[1]].to(torch.float32).clone()
        else:
            assert B is not None
            A = _filled(fill, name, "A", B.shape[1], float(scaling), where)
        if B is None:
            B = _filled(fill, name, "B", A.shape[0], float(scaling), where)
        if A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise PayloadError(f"{where}: rank mismatch, A is {tuple(A.shape)} but B is {tuple(B.shape)}")
        if expected_shapes is not None:
            out_f, in_f = expected_shapes[name]
            if (B.shape[0], A.shape[1]) != (out_f, in_f):
                raise PayloadError(
                    f"{where}: update is {B.shape[0]}x{A.shape[1]} but the module is {out_f}x{in_f}"
                )
        adapter[name] = LoraFactors(A=A, B=B, scaling=float(scaling))
    return adapter
