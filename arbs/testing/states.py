"""The one random E1TM state, trit packer and exact compare of every test and benchmark (numpy only).

- ``random_trits`` / ``random_state``: a tensor's arrays from a numpy Generator, valid for formats by
  construction (trits in {-1, 0, +1}, padding trits 0, corr_accum within the rule's bound for the step,
  flip_accum within +-theta and 0 on padding), with options that plant the bounds, narrow E, widen
  corr_accum past the rule's bound or write invalid bytes (kernel tests that go beyond the format).
- ``random_checkpoint``: a ``store.Checkpoint`` of such tensors.
- ``pack_trits``: base-3 packing through the numpy reference (``reference.pack``), independent of
  ``arbs.ops.pack`` and the kernels that the tests check against it.
- ``assert_same`` / ``assert_same_checkpoint``: exact equality (floats bit for bit), numpy arrays or
  torch tensors; a mismatch reports how many entries differ and the first index.

``arbs.testing.strategies`` draws its hypothesis states through ``random_state``.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from . import reference

__all__ = ["pack_trits", "corr_bound", "random_trits", "random_state", "random_checkpoint", "assert_same",
           "assert_same_checkpoint"]


def pack_trits(T, gs: int) -> np.ndarray:
    """int8 trits (rows, cols) -> uint8 (rows, packed_cols(padded_cols(cols, gs))): digit = trit + 1,
    first trit least significant, padding trits 0 (digit 1)."""
    T = np.asarray(T)
    return reference.pack(T, formats.packed_cols(formats.padded_cols(T.shape[1], gs)))


def corr_bound(scheme: formats.Scheme, step: int) -> int:
    """Largest |corr_accum| the rule allows: gs*step (average) or K*gs - 1 (carry, flip)."""
    return scheme.gs * step if scheme.carry_limit == 0 else scheme.carry_limit - 1


def random_trits(rng: np.random.Generator, rows: int, cols: int, gs: int | None = None) -> np.ndarray:
    """Uniform int8 trits (rows, cols); with ``gs``, two random groups of gs trits are 0 and, in a tensor
    of 3 rows or more, one whole row."""
    T = rng.integers(-1, 2, (rows, cols), dtype=np.int8)
    if gs and T.size:
        ng = formats.n_groups(cols, gs)
        for r, g in zip(rng.integers(0, rows, 2), rng.integers(0, ng, 2)):
            T[r, g * gs:(g + 1) * gs] = 0
        if rows >= 3:
            T[rng.integers(0, rows)] = 0
    return T


def _plant(rng: np.random.Generator, a: np.ndarray, frac: float, hi: int, lo: int) -> None:
    """Set ``hi`` and ``lo`` alternately at distinct random entries of ``a``: a fraction ``frac`` of them,
    at least two (all of them in a one-entry array)."""
    if frac <= 0 or a.size == 0:
        return
    n = min(a.size, max(2, round(frac * a.size)))
    a.flat[rng.choice(a.size, n, replace=False)] = np.resize(np.array([hi, lo], a.dtype), n)


def random_state(rng: np.random.Generator, scheme: formats.Scheme, shape, step: int = 0, *,
                 T: np.ndarray | None = None, fused: bool = False, E_range: tuple[int, int] = (-128, 127),
                 corr_max: int | None = None, extremes: float = 0.05,
                 invalid_bytes: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one tensor of logical ``shape`` under ``scheme`` at ``step`` (``scheme.arrays()``;
    T_packed and E with ``fused``).

    T            the trits to pack (int8 (rows, cols)); default ``random_trits(rng, rows, cols, gs)``
    E_range      E uniform in [lo, hi]
    corr_max     corr_accum uniform in [-corr_max, corr_max]; default ``corr_bound(scheme, step)``. A larger
                 value gives a state the format rejects (kernel tests of the integer arithmetic)
    extremes     fraction of the groups (at least two) where E is set to 127 and -128; likewise corr_accum
                 to +-corr_max and flip_accum (real columns) to +-theta, at other random spots. 0: none
    invalid_bytes  about 1 in 20 T_packed bytes set to 243..255 (readers reject those; kernels must
                 still agree on them)
    """
    rows, cols = formats.tensor_view(shape)
    gs = scheme.gs
    if T is None:
        T = random_trits(rng, rows, cols, gs)
    elif T.shape != (rows, cols):
        raise ValueError(f"T has shape {T.shape}; shape {tuple(shape)} needs {(rows, cols)}")
    tp = pack_trits(T, gs)
    if invalid_bytes and tp.size:
        n = max(1, tp.size // 20)
        tp.flat[rng.integers(0, tp.size, n)] = rng.integers(243, 256, n)
    E = rng.integers(E_range[0], E_range[1] + 1, formats.array_shape("E", rows, cols, gs), dtype=np.int8)
    _plant(rng, E, extremes, 127, -128)
    arrays = {"T_packed": tp, "E": E}
    if fused:
        return arrays
    bound = corr_bound(scheme, step) if corr_max is None else corr_max
    corr = rng.integers(-bound, bound + 1, formats.array_shape("corr_accum", rows, cols, gs), dtype=np.int64)
    if bound:
        _plant(rng, corr, extremes, bound, -bound)
    arrays["corr_accum"] = corr
    if "flip_accum" in scheme.arrays():
        th = scheme.params["theta"]
        fa = np.zeros(formats.array_shape("flip_accum", rows, cols, gs), np.int8)
        real = rng.integers(-th, th + 1, (rows, cols), dtype=np.int8)
        _plant(rng, real, extremes, th, -th)
        fa[:, :cols] = real
        arrays["flip_accum"] = fa
    return arrays


def random_checkpoint(shapes, *, format: str = "E1TM32", rule: str = "carry", fused: bool = False, step: int = 7,
                      seed: int = 0, meta: dict | None = None, **options):
    """A valid ``store.Checkpoint`` (kind e1tm) of tensors ``blocks.{i}.attn.qkv.weight`` of ``shapes``,
    the rule's default parameters, ``random_state(..., **options)`` per tensor from ``seed``; fused: T_packed
    and E only, no rule and no step_counter."""
    from ..store import Checkpoint, TensorState

    scheme = formats.make_scheme(format, rule)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, shape in enumerate(shapes):
        name = f"blocks.{i}.attn.qkv.weight"
        arrays = random_state(rng, scheme, shape, step, fused=fused, **options)
        tensors[name] = TensorState(name=name, shape=tuple(shape), arrays=arrays)
    return Checkpoint(
        kind="e1tm", format=format, gs=scheme.gs, rule=None if fused else rule,
        rule_params={} if fused else dict(scheme.params), fused=fused, step_counter=None if fused else step,
        tensors=tensors, meta={"model": "test"} if meta is None else meta,
    )


def _numpy(a) -> np.ndarray:
    """A numpy array of ``a``; torch tensors are copied to the CPU (bfloat16 widened exactly to float32)."""
    if hasattr(a, "detach"):
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(a)


def assert_same(got, want, what: str, *, any_nan: bool = False) -> None:
    """Exact equality of dtype, shape and values; floats compared as bit patterns (so -0.0 != 0.0 and a
    NaN equals only the same NaN). ``any_nan``: a NaN matches any NaN (CUDA and x86 write different NaN
    payloads). On a mismatch the message gives the count and the first differing index."""
    got, want = _numpy(got), _numpy(want)
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    if got.dtype.kind == "f":
        bits = np.dtype(f"u{got.dtype.itemsize}")
        bad = got.view(bits) != want.view(bits)
        if any_nan:
            bad &= ~(np.isnan(got) & np.isnan(want))
    else:
        bad = got != want
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ; first at {first}: {got[first]!r} vs {want[first]!r}")


CHECKPOINT_FIELDS = ("kind", "format", "gs", "rule", "rule_params", "fused", "step_counter", "meta")


def assert_same_checkpoint(got, want, what: str = "checkpoint") -> None:
    """Every field of ``CHECKPOINT_FIELDS`` equal, the same tensors (names, shapes, array names in order)
    and every array ``assert_same``."""
    for f in CHECKPOINT_FIELDS:
        assert getattr(got, f) == getattr(want, f), f"{what}: {f} {getattr(got, f)!r} vs {getattr(want, f)!r}"
    assert list(got.tensors) == list(want.tensors), f"{what}: tensors {list(got.tensors)} vs {list(want.tensors)}"
    for name, tw in want.tensors.items():
        tg = got.tensors[name]
        assert tg.name == tw.name and tg.shape == tw.shape, f"{what} {name}: {tg.name} {tg.shape} vs {tw.name} {tw.shape}"
        assert list(tg.arrays) == list(tw.arrays), f"{what} {name}: arrays {list(tg.arrays)} vs {list(tw.arrays)}"
        for k, a in tw.arrays.items():
            assert_same(tg.arrays[k], a, f"{what} {name}/{k}")
