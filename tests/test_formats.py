"""The format table (arbs.formats): names, errors, shape rules, bits per weight, rule parameters.

Values pinned here are normative (formats/SPEC.md); changing one is a format change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbs import formats
from arbs.errors import ArbsError, ConfigError

# hypothesis imports libcst to print a falsifying example, and libcst's import warns (mypy_extensions
# TypedDict): without this, any failure would surface as an INTERNALERROR under filterwarnings=error.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
FAST = settings(max_examples=50, deadline=None)


FLIP_DEFAULTS = {"K": 16, "theta": 16, "gain": 4, "horizon": 0, "vote_max": 3, "vote_norm": 1, "reset": 0}


def test_constants():
    assert formats.FORMAT_VERSION == 1
    assert formats.TRITS_PER_BYTE == 5
    assert formats.MAX_PACKED_BYTE == 3**5 - 1 == 242
    assert (formats.E_MIN, formats.E_MAX) == (-128, 127) == (np.iinfo(np.int8).min, np.iinfo(np.int8).max)
    assert formats.VARIANTS == {"E1TM4": 4, "E1TM6": 6, "E1TM8": 8, "E1TM16": 16, "E1TM32": 32, "E1TM64": 64, "E1TM96": 96}
    assert formats.DEFAULT_VARIANT == "E1TM32"
    assert all(name == f"E1TM{gs}" for name, gs in formats.VARIANTS.items())
    assert list(formats.RULES) == ["average", "carry", "flip"]
    assert {n: p.default for n, p in formats.PARAMS.items()} == FLIP_DEFAULTS
    assert {n: p.absent for n, p in formats.PARAMS.items() if p.absent is not None} == \
        {"vote_max": 1, "vote_norm": 0, "reset": 0}
    assert formats.DEFAULT_RULE == "flip"


def test_array_table():
    dtypes = {name: spec.dtype for name, spec in formats.ARRAYS.items()}
    assert dtypes == {"T_packed": np.uint8, "E": np.int8, "corr_accum": np.int64, "flip_accum": np.int8}
    assert all(np.dtype(d).kind in "iu" for d in dtypes.values()), "E1TM state holds no float arrays"
    assert formats.STEP_COUNTER == "step_counter" and formats.STEP_COUNTER_DTYPE == np.int64
    assert formats.tensor_arrays("average") == ("T_packed", "E", "corr_accum")
    assert formats.tensor_arrays("carry") == ("T_packed", "E", "corr_accum")
    assert formats.tensor_arrays("flip") == ("T_packed", "E", "corr_accum", "flip_accum")
    assert formats.tensor_arrays(None, fused=True) == formats.tensor_arrays("flip", fused=True) == ("T_packed", "E")


@pytest.mark.parametrize("bad", ["E1TM23", "e1tm32", "E1TM3", "E1TM322"])
def test_unknown_variant_suggests(bad):
    with pytest.raises(ConfigError) as e:
        formats.variant_gs(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    assert "E1TM4, E1TM6, E1TM8, E1TM16, E1TM32, E1TM64, E1TM96" in msg
    assert msg.endswith("Did you mean 'E1TM32'?")
    assert isinstance(e.value, ArbsError) and isinstance(e.value, ValueError)


def test_unknown_names_without_close_match():
    with pytest.raises(ConfigError) as e:
        formats.variant_gs("Q4_K")
    assert "Did you mean" not in str(e.value) and "valid E1TM formats" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown update rule 'Carry'.*Did you mean 'carry'\?"):
        formats.rule_spec("Carry")
    with pytest.raises(ConfigError, match="valid rules: average, carry, flip"):
        formats.make_scheme("E1TM32", "sgd")
    with pytest.raises(ConfigError, match="Did you mean 'E1TM8'"):
        formats.make_scheme("e1tm8", "carry")


def test_tensor_view():
    assert formats.tensor_view((7,)) == (1, 7)
    assert formats.tensor_view((0,)) == (1, 0)
    assert formats.tensor_view((3, 5)) == (3, 5)
    assert formats.tensor_view((4, 3, 2, 5)) == (4, 30)
    assert formats.tensor_view((2, 0, 3)) == (2, 0)
    assert formats.tensor_view([np.int64(3), 4]) == (3, 4)
    with pytest.raises(ConfigError, match="0-d"):
        formats.tensor_view(())
    with pytest.raises(ConfigError, match="negative"):
        formats.tensor_view((3, -1))


@FAST
@given(cols=st.integers(0, 10_000), gs=st.sampled_from(sorted(formats.VARIANTS.values())), rows=st.integers(0, 9))
def test_shape_rules(cols, gs, rows):
    cols_p = formats.padded_cols(cols, gs)
    assert cols_p % gs == 0 and cols <= cols_p < cols + gs
    assert formats.n_groups(cols, gs) == cols_p // gs == math.ceil(cols / gs)
    assert formats.packed_cols(cols_p) == math.ceil(cols_p / 5)
    assert formats.array_shape("T_packed", rows, cols, gs) == (rows, math.ceil(cols_p / 5))
    assert formats.array_shape("E", rows, cols, gs) == (rows, cols_p // gs)
    assert formats.array_shape("corr_accum", rows, cols, gs) == (rows, cols_p // gs)
    assert formats.array_shape("flip_accum", rows, cols, gs) == (rows, cols_p)


def test_shape_examples():
    # 4096 x 4096 E1TM32: 820 bytes per row (4096 trits -> ceil(4096/5)), 128 groups
    assert formats.array_shape("T_packed", 4096, 4096, 32) == (4096, 820)
    assert formats.array_shape("E", 4096, 4096, 32) == (4096, 128)
    # cols = 10, gs = 6: padded to 12 trits -> 3 bytes, 2 groups
    assert formats.array_shape("T_packed", 1, 10, 6) == (1, 3)
    assert formats.array_shape("flip_accum", 1, 10, 6) == (1, 12)


@pytest.mark.parametrize("name, gs", list(formats.VARIANTS.items()))
def test_theoretical_bpw_every_variant(name, gs):
    assert formats.theoretical_bpw(gs, fused=True) == pytest.approx(8 / 5 + 8 / gs)
    assert formats.theoretical_bpw(gs, "carry") == pytest.approx(8 / 5 + 8 / gs + 64 / gs)
    assert formats.theoretical_bpw(gs, "average") == formats.theoretical_bpw(gs, "carry") == formats.theoretical_bpw(gs)
    assert formats.theoretical_bpw(gs, "flip") == pytest.approx(8 / 5 + 8 / gs + 64 / gs + 8)


def test_theoretical_bpw_examples():
    assert formats.theoretical_bpw(32, fused=True) == pytest.approx(1.85)
    assert formats.theoretical_bpw(32, "carry") == pytest.approx(3.85)
    assert formats.theoretical_bpw(8, fused=True) == pytest.approx(2.6)
    assert formats.theoretical_bpw(32, "flip") == pytest.approx(11.85)
    assert formats.theoretical_bpw(96, fused=True) == pytest.approx(1.6 + 1 / 12)


def test_rule_params():
    assert formats.rule_params("average") == {}
    assert formats.rule_params("carry") == {"K": 16}
    assert formats.rule_params("flip") == FLIP_DEFAULTS
    assert formats.rule_params("flip", K=3, theta=None) == FLIP_DEFAULTS | {"K": 3}
    with pytest.raises(ConfigError, match="rule 'carry' takes no parameter theta"):
        formats.rule_params("carry", theta=3)
    assert formats.recorded_rule_params("flip", {"K": 2, "theta": 3, "gain": 0, "horizon": 0}) == \
        {"K": 2, "theta": 3, "gain": 0, "horizon": 0, "vote_max": 1, "vote_norm": 0, "reset": 0}  # written before
    # vote_max, vote_norm and reset existed
    with pytest.raises(ConfigError, match="rule_params has keys"):
        formats.recorded_rule_params("flip", {"K": 2})
    assert formats.rule_params("carry", K=np.int64(5)) == {"K": 5} and type(formats.rule_params("carry", K=np.int64(5))["K"]) is int
    for bad in [dict(K=0), dict(K=(1 << 20) + 1), dict(K=True), dict(K=2.0), dict(K="16")]:
        with pytest.raises(ConfigError, match="K"):
            formats.rule_params("carry", **bad)
    for bad in [dict(theta=0), dict(theta=128)]:
        with pytest.raises(ConfigError, match="theta"):
            formats.rule_params("flip", **bad)
    for bad in [dict(vote_max=0), dict(vote_max=128)]:
        with pytest.raises(ConfigError, match="vote_max"):
            formats.rule_params("flip", **bad)
    for bad in [dict(vote_norm=2), dict(vote_norm=-1), dict(reset=-1), dict(reset=127)]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            formats.rule_params("flip", **bad)
    with pytest.raises(ConfigError, match="reset=16 must be below theta=16"):
        formats.rule_params("flip", theta=16, reset=16)
    assert formats.rule_params("flip", theta=64, reset=63)["reset"] == 63
    assert formats.rule_params("carry", K=1 << 20) == {"K": 1 << 20}


def test_xi_ratio_and_carry_limit():
    assert formats.xi_ratio("average", {}, 0, 32) == (4, 0)  # Xi = 0 at step 0
    assert formats.xi_ratio("average", {}, 10, 32) == (4, 320)
    assert formats.xi_ratio("carry", {"K": 16}, 10, 32) == (1, 512)
    assert formats.xi_ratio("flip", {"K": 2, "theta": 8}, 0, 6) == (1, 12)
    assert formats.carry_limit("average", {}, 32) == 0
    assert formats.carry_limit("carry", {"K": 16}, 32) == 512
    with pytest.raises(ConfigError):
        formats.xi_ratio("nope", {}, 0, 32)


def test_make_scheme():
    s = formats.make_scheme(rule="carry")
    assert (s.format, s.rule, s.params, s.gs, s.carry_limit) == ("E1TM32", "carry", {"K": 16}, 32, 512)
    assert formats.make_scheme().rule == "flip"
    assert s.xi_ratio(3) == (1, 512) and s.arrays() == ("T_packed", "E", "corr_accum")
    a = formats.make_scheme("E1TM96", "average")
    assert a.xi_ratio(0) == (4, 0) and a.xi_ratio(2) == (4, 192) and a.carry_limit == 0
    f = formats.make_scheme("E1TM4", "flip", K=1, theta=1)
    assert f.arrays()[-1] == "flip_accum" and f.carry_limit == 4
