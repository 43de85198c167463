"""Shared test helpers: a random, valid E1TM checkpoint (numpy only), as functions and as a fixture."""

import numpy as np
import pytest

from arbs import formats
from arbs.store import Checkpoint, TensorState


def pack_trits(T: np.ndarray, gs: int) -> np.ndarray:
    """Base-3 pack (rows, cols) int8 trits: digit = trit+1, first trit least significant, padding trit 0."""
    rows, cols = T.shape
    nb = formats.packed_cols(formats.padded_cols(cols, gs))
    d = np.ones((rows, nb * formats.TRITS_PER_BYTE), np.int16)  # digit 1 == trit 0
    d[:, :cols] = T + 1
    return (d.reshape(rows, nb, formats.TRITS_PER_BYTE) @ np.array([1, 3, 9, 27, 81], np.int16)).astype(np.uint8)


def build_e1tm(shapes, *, format="E1TM32", rule="carry", fused=False, step=7, seed=0, meta=None) -> Checkpoint:
    """Valid random state for tensors of ``shapes``; corr_accum, flip_accum and E reach their bounds."""
    gs = formats.variant_gs(format)
    params = {} if fused else formats.rule_params(rule)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, shape in enumerate(shapes):
        name = f"blocks.{i}.attn.qkv.weight"
        rows, cols = formats.tensor_view(shape)
        arrays = {
            "T_packed": pack_trits(rng.integers(-1, 2, (rows, cols), dtype=np.int8), gs),
            "E": rng.integers(-128, 128, formats.array_shape("E", rows, cols, gs), dtype=np.int8),
        }
        if not fused:
            lim = gs * step if rule == "average" else params["K"] * gs - 1
            corr = rng.integers(-lim, lim + 1, formats.array_shape("corr_accum", rows, cols, gs), dtype=np.int64)
            corr.flat[:2] = [lim, -lim][: corr.size]
            arrays["corr_accum"] = corr
            if rule == "flip":
                th = params["theta"]
                arrays["flip_accum"] = rng.integers(-th, th + 1, formats.array_shape("flip_accum", rows, cols, gs), dtype=np.int8)
        tensors[name] = TensorState(name=name, shape=tuple(shape), arrays=arrays)
    return Checkpoint(
        kind="e1tm", format=format, gs=gs, rule=None if fused else rule, rule_params=params, fused=fused,
        step_counter=None if fused else step, tensors=tensors, meta={"model": "test"} if meta is None else meta,
    )


@pytest.fixture
def make_e1tm():
    """The ``build_e1tm`` factory, for tests that prefer a fixture."""
    return build_e1tm


def scheme_for(format: str, rule: str, **params) -> formats.Scheme:
    """make_scheme with the parameters of ``params`` that ``rule`` takes (tests parametrized over rules)."""
    return formats.make_scheme(format, rule, **{k: v for k, v in params.items() if k in formats.rule_spec(rule).params})
