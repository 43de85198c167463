"""The Triton kernels (arbs.kernels.triton_gpu) against the numba kernels, on random states.

Integers must be equal and W_eff bit-identical in float32 (NaN where numba has NaN, whatever its
payload: CUDA and x86 write different ones). The ``gpu`` tests run on CUDA; ``test_interpreter_matches_numba``
runs the same checks on CPU tensors through Triton's interpreter, in a child process
(``TRITON_INTERPRET=1`` must be set before triton is imported, and must not leak into other tests). Run
this file as a script to do the interpreter checks directly: ``TRITON_INTERPRET=1 python tests/test_triton.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arbs import formats, schedule
from arbs import ops
from arbs.kernels import cpu
from arbs.testing.states import assert_same, random_state

pytest.importorskip("triton", reason="triton is not installed (pip install 'arbs[gpu]')")

VARIANTS = tuple(formats.VARIANTS.values())  # every gs: 4, 6, 8, 16, 32, 64, 96
GPU_SHAPES = [(1, 1), (3, 7), (17, 100), (64, 257), (129, 4099), (256, 1024)]
# the interpreter costs ~0.05 s per launch: a few (gs, rows, cols) that cover odd groups, padding, 1x1
INTERP_CASES = [(4, 9, 101), (6, 3, 7), (32, 5, 33), (32, 4, 200), (96, 1, 1), (96, 3, 250)]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _tg():
    from arbs.kernels import triton_gpu

    return triton_gpu


# -- random states (arbs.testing.states) -----------------------------------------------------------
SCHEMES = {gs: formats.make_scheme(v, "carry") for v, gs in formats.VARIANTS.items()}


def kernel_arrays(rng, rows, cols, gs, *, corr_max=None, invalid_bytes=False):
    """(T_packed, E, corr_accum) of ``random_state``: E = 127/-128 in a fifth of the groups, some trit groups
    and a row 0, |corr_accum| <= corr_max (default: carry's K*gs - 1; more than the format allows in some
    cases), with ``invalid_bytes`` some T_packed bytes 243..255."""
    s = random_state(rng, SCHEMES[gs], (rows, cols), corr_max=corr_max, extremes=0.2, invalid_bytes=invalid_bytes)
    return s["T_packed"], s["E"], s["corr_accum"]


def random_grad(rng, rows, cols, *, nonfinite=False):
    g = rng.standard_normal((rows, cols)).astype(np.float32)
    g[rng.random((rows, cols)) < 0.1] = 0.0
    if nonfinite and g.size:
        g.flat[rng.integers(0, g.size, 3)] = [np.nan, np.inf, -np.inf]
    return g


def xi_cases(gs):
    """(num, den, largest |corr_accum|) for average (several steps), carry/flip K=16 and K=1, and den == 0."""
    return [(4, 0, 999), (4, 3 * gs, 3 * gs), (4, 1_000_003 * gs, 1 << 40), (1, 16 * gs, 16 * gs - 1), (1, gs, gs - 1)]


def t(a, dev):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dev)


# -- the checks (shared by the GPU tests and the interpreter run) ----------------------------------
def check_materialize(dev, seed, rows, cols, gs):
    tg, rng = _tg(), np.random.default_rng(seed)
    for num, den, bound in xi_cases(gs):
        tp, E, corr = kernel_arrays(rng, rows, cols, gs, corr_max=bound)
        want = np.empty((rows, cols), np.float32)
        cpu.materialize_into(tp, E, corr, gs, num, den, want)
        out = torch.full((rows, cols), 7.0, device=dev)  # poisoned: every element must be written
        tg.materialize_into(t(tp, dev), t(E, dev), t(corr, dev), gs, num, den, out)
        assert_same(out, want, f"materialize gs={gs} {rows}x{cols} num={num} den={den}", any_nan=True)
        if dev != "cpu":  # bf16 out: the float32 value rounded to nearest even
            ob = torch.empty((rows, cols), dtype=torch.bfloat16, device=dev)
            tg.materialize_into(t(tp, dev), t(E, dev), t(corr, dev), gs, num, den, ob)
            wb = torch.from_numpy(want).to(torch.bfloat16)
            assert_same(ob.float(), wb.float().numpy(), f"materialize bf16 gs={gs} {rows}x{cols}", any_nan=True)


def check_vote_delta(dev, seed, rows, cols, gs):
    tg, rng = _tg(), np.random.default_rng(seed)
    tp, _, _ = kernel_arrays(rng, rows, cols, gs, invalid_bytes=True)
    ng = formats.padded_cols(cols, gs) // gs
    dtypes = [torch.float32, torch.float64] + ([torch.bfloat16] if dev != "cpu" else [])
    for nonfinite in (False, True):
        for dt in dtypes:
            g = t(random_grad(rng, rows, cols, nonfinite=nonfinite), dev).to(dt)
            gc = g.cpu().double().numpy() if dt != torch.float64 else g.cpu().numpy()
            want = np.empty((rows, ng), np.int64)
            bad_want = cpu.vote_delta_into(gc, tp, gs, want)
            delta = torch.full((rows, ng), 12345, dtype=torch.int64, device=dev)
            bad = tg.vote_delta_into(g, t(tp, dev), gs, delta)
            assert bad == bad_want, f"vote nonfinite count {bad} vs {bad_want}"
            assert_same(delta, want, f"vote delta gs={gs} {rows}x{cols} {dt}")


def check_apply_votes(dev, seed, rows, cols, gs):
    tg, rng = _tg(), np.random.default_rng(seed)
    ng = formats.padded_cols(cols, gs) // gs
    for limit in (0, 16 * gs, 1):
        _, E, corr = kernel_arrays(rng, rows, cols, gs, corr_max=max(limit - 1, 1))
        span = max(limit, 1) * 300  # multi-carries and saturations at E = -128/127
        delta = rng.integers(-span, span + 1, (rows, ng)).astype(np.int64)
        delta.flat[::5] = rng.integers(-gs, gs + 1, delta.flat[::5].shape)
        c_want, e_want = corr.copy(), E.copy()
        n_want = cpu.apply_votes(c_want, e_want, delta, limit)
        c, e = t(corr, dev), t(E, dev)
        n = tg.apply_votes(c, e, t(delta, dev), limit)
        assert tuple(int(x) for x in n) == tuple(int(x) for x in n_want), f"apply counts {n} vs {n_want}"
        assert_same(c, c_want, f"apply corr limit={limit}")
        assert_same(e, e_want, f"apply E limit={limit}")


def check_flip(dev, seed, rows, cols, gs):
    tg, rng = _tg(), np.random.default_rng(seed)
    cols_p = formats.padded_cols(cols, gs)
    for theta, gain_m, vote_max, tn, reset in ((1, 0.0, 1, False, 0), (8, 0.0, 1, False, 7), (127, 0.0, 1, False, 0),
                                               (2, 0.7, 1, False, 1), (8, 5.0, 1, False, 0), (16, 1.7, 3, False, 0),
                                               (16, 1.7, 3, True, 15), (4, 0.7, 1, True, 0)):
        base, step = int(rng.integers(0, 2**63)) * 2 + 1, int(rng.integers(0, 10**6))
        tp, _, _ = kernel_arrays(rng, rows, cols, gs, invalid_bytes=theta == 8)
        fa = rng.integers(-theta, theta + 1, (rows, cols_p)).astype(np.int8)
        fa.flat[::13] = rng.choice(np.array([-128, 127, theta, -theta], np.int8), fa.flat[::13].shape)
        g = random_grad(rng, rows, cols)
        tp_want, fa_want = tp.copy(), fa.copy()
        n_want = cpu.flip_into(g, tp_want, fa_want, theta, gain_m, vote_max, np.uint64(schedule.mix64(base ^ step)), tn, reset)
        tp_d, fa_d = t(tp, dev), t(fa, dev)
        n = tg.flip_into(t(g, dev), tp_d, fa_d, theta, gain_m, base, step, vote_max, tn, reset)
        assert n == n_want, f"flips {n} vs {n_want}"
        assert_same(tp_d, tp_want, f"flip T_packed theta={theta} gs={gs} {rows}x{cols}")
        assert_same(fa_d, fa_want, f"flip flip_accum theta={theta}")


def check_fuse(dev, seed, rows, cols, gs):
    tg, rng = _tg(), np.random.default_rng(seed)
    for num, den, bound in xi_cases(gs) + [(4, 8, (1 << 62) - 1)]:
        _, E, corr = kernel_arrays(rng, rows, cols, gs, corr_max=bound)
        if den:  # exact halves: round half to even
            corr.flat[::3] = (den // (2 * num)) * rng.choice([-1, 1, 3, -3], corr.flat[::3].shape)
        want = np.empty_like(E)
        n_want = cpu.fuse_into(E, corr, num, den, want)
        out = torch.full(E.shape, 99, dtype=torch.int8, device=dev)
        n = tg.fuse_into(t(E, dev), t(corr, dev), num, den, out)
        assert tuple(n) == tuple(int(x) for x in n_want), f"fuse counts {n} vs {n_want}"
        assert_same(out, want, f"fuse num={num} den={den}")


def check_module(dev, seed, rows, cols, fmt, rule):
    """nn.cuda.materialize(mod) / vote(mod, grad) against ops.materialize / ops.vote, several steps."""
    from arbs import nn as anm
    from arbs.errors import NonFiniteError
    from arbs.nn import cuda as tg

    rng = np.random.default_rng(seed)
    params = {"flip": dict(K=4, theta=3, gain=3, horizon=6), "carry": dict(K=4)}.get(rule, {})
    clock = anm.Clock(formats.make_scheme(fmt, rule, **params), seed=seed)
    state, _ = ops.convert(rng.standard_normal((rows, cols)).astype(np.float32), clock.scheme)
    mod = anm.E1TMLinear(cols, rows, clock, state).to(dev)
    ref = {k: v.copy() for k, v in state.items()}
    for step in range(5):
        clock.step_counter = step
        clock.fuse_phase = step == 4  # the fuse phase: votes leave E and corr_accum alone
        w = tg.materialize(mod)
        assert w.dtype == torch.float32 and tuple(w.shape) == (rows, cols)
        assert_same(w, ops.materialize(ref, (rows, cols), clock.scheme, step), f"module materialize step {step}", any_nan=True)
        g = random_grad(rng, rows, cols) * 1e-3
        st = tg.vote(mod, t(g, dev))
        st_want = ops.vote(ref, g, (rows, cols), clock.scheme, step_counter=step, seed=clock.seed,
                           tensor=mod.tensor_index, scales=not clock.fuse_phase)
        assert st == st_want, f"{st} vs {st_want}"
        for k in clock.scheme.arrays():
            assert_same(getattr(mod, k), ref[k], f"module {rule} {k} step {step}")
    bad = random_grad(rng, rows, cols, nonfinite=True)
    before = {k: getattr(mod, k).cpu().clone() for k in clock.scheme.arrays()}
    with pytest.raises(NonFiniteError):
        tg.vote(mod, t(bad, dev))
    for k in clock.scheme.arrays():
        assert torch.equal(getattr(mod, k).cpu(), before[k]), f"{k} changed by a refused vote"


def check_average_range(dev):
    """average rule: a corr_accum within gs of the int64 limit refuses the vote and changes nothing."""
    from arbs import nn as anm
    from arbs.errors import IntegerRangeError
    from arbs.nn import cuda as tg

    clock = anm.Clock(formats.make_scheme("E1TM4", "average"))
    mod = anm.E1TMLinear(8, 2, clock).to(dev)
    mod.corr_accum[1, 1] = (1 << 63) - 2
    before = mod.corr_accum.cpu().clone()
    with pytest.raises(IntegerRangeError):
        tg.vote(mod, torch.ones(2, 8, device=dev))
    assert torch.equal(mod.corr_accum.cpu(), before)


def check_shared_counters(dev):
    """vote_async into one counters tensor: after a layer with NaN/inf, later layers change nothing."""
    from arbs import nn as anm
    from arbs.nn import cuda as tg

    rng = np.random.default_rng(11)
    clock = anm.Clock(formats.make_scheme("E1TM8", "flip", K=1, theta=1))
    mods = [anm.E1TMLinear(20, 6, clock, ops.convert(rng.standard_normal((6, 20)).astype(np.float32), clock.scheme)[0]).to(dev)
            for _ in range(3)]
    ref = [{k: v.copy() for k, v in m.state_arrays().items()} if dev == "cpu" else
           {k: getattr(m, k).cpu().numpy().copy() for k in clock.scheme.arrays()} for m in mods]
    grads = [random_grad(rng, 6, 20) for _ in range(3)]
    grads[1][2, 3] = np.nan
    for m, g in zip(mods, grads):
        tg.vote_async(m, t(g, dev))
    nonfinite, oor, carries, sats, flips = clock.device_counts.tolist()
    st = ops.vote(ref[0], grads[0], (6, 20), clock.scheme)  # only the first layer voted
    assert (nonfinite, oor, carries, sats, flips) == (1, 0, st.carries, st.saturations, st.flips)
    for m, r in zip(mods, ref):
        for k in clock.scheme.arrays():
            assert_same(getattr(m, k), r[k], f"shared counters {k}")


CHECKS = (check_materialize, check_vote_delta, check_apply_votes, check_flip, check_fuse)


# -- GPU tests -------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("gs", VARIANTS)
@pytest.mark.parametrize("rows,cols", GPU_SHAPES)
def test_kernel_matches_numba(check, gs, rows, cols):
    check("cuda", rows * 7919 + cols * 31 + gs, rows, cols, gs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
@pytest.mark.parametrize("fmt,rows,cols", [("E1TM32", 48, 130), ("E1TM6", 7, 19), ("E1TM96", 33, 500)])
def test_module_helpers_match_ops(fmt, rows, cols, rule):
    check_module("cuda", rows + cols, rows, cols, fmt, rule)


@pytest.mark.gpu
@needs_cuda
def test_average_range_refused():
    check_average_range("cuda")


@pytest.mark.gpu
@needs_cuda
def test_shared_counters_stop_after_nonfinite():
    check_shared_counters("cuda")


@pytest.mark.gpu
@needs_cuda
def test_materialize_every_carry_scale_bit_exact():
    """Every (E, corr_accum) of E1TM32 carry at K=16: 256 x 1023 scales, T = +1 so W_eff = S."""
    gs, limit = 32, 16 * 32
    E = np.repeat(np.arange(-128, 128, dtype=np.int8)[:, None], 2 * limit - 1, axis=1)  # (256, 1023)
    corr = np.broadcast_to(np.arange(-limit + 1, limit, dtype=np.int64), E.shape).copy()
    rows, ng = E.shape
    tp = np.full((rows, formats.packed_cols(ng * gs)), 242, np.uint8)  # all trits +1
    want = np.empty((rows, ng * gs), np.float32)
    cpu.materialize_into(tp, E, corr, gs, 1, limit, want)
    out = torch.empty(want.shape, device="cuda")
    _tg().materialize_into(t(tp, "cuda"), t(E, "cuda"), t(corr, "cuda"), gs, 1, limit, out)
    assert_same(out, want, "every carry scale", any_nan=True)


@pytest.mark.gpu
@needs_cuda
def test_materialize_average_scales_bit_exact_large_sample():
    """4M groups of the average rule at late steps (Xi in [-4, 4], many distinct fractions)."""
    rng = np.random.default_rng(5)
    gs, rows, ng = 4, 2048, 2048
    for step in (7, 123_457, 10**9 + 7):
        den = step * gs
        E = rng.integers(-120, 120, (rows, ng)).astype(np.int8)
        corr = rng.integers(-den, den + 1, (rows, ng)).astype(np.int64)
        tp = np.full((rows, formats.packed_cols(ng * gs)), 242, np.uint8)
        want = np.empty((rows, ng * gs), np.float32)
        cpu.materialize_into(tp, E, corr, gs, 4, den, want)
        out = torch.empty(want.shape, device="cuda")
        _tg().materialize_into(t(tp, "cuda"), t(E, "cuda"), t(corr, "cuda"), gs, 4, den, out)
        assert_same(out, want, f"average scales step={step}", any_nan=True)


@pytest.mark.gpu
@needs_cuda
def test_nn_linear_on_cuda_trains_like_cpu_votes():
    """arbs.nn routes CUDA buffers through triton_gpu: a forward/backward/step changes the state."""
    from arbs import nn as anm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 256))
    anm.ternarize_(model, "E1TM32", "flip", K=2, theta=2)
    model.cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (4, 16), device="cuda")
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        anm.step(model)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert anm.model_clock(model).step_counter == 3


@pytest.mark.gpu
@needs_cuda
def test_nn_cuda_nan_gradient_raises_at_step_and_keeps_state():
    """On a GPU the step's vote counts are read once, at step(): a NaN gradient raises there, no state moved."""
    from arbs import nn as anm
    from arbs.errors import NonFiniteError

    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    anm.ternarize_(model, "E1TM32", "flip", K=2, theta=2)
    model.cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(torch.randn(4, 64, device="cuda"))
    (y.float() * float("nan")).sum().backward()
    with pytest.raises(NonFiniteError):
        anm.step(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert anm.model_clock(model).step_counter == 0


@pytest.mark.gpu
@needs_cuda
def test_nn_cuda_bf16_votes_equal_ops_vote_of_the_same_gradient():
    """Under bf16 autocast the layer votes on its bf16 weight gradient as is: the same integers as
    ops.vote of that gradient (upcast exactly to float32) on the CPU."""
    from arbs import nn as anm

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=False)
    model = torch.nn.Sequential(lin)
    model = anm.ternarize_(model, "E1TM32", "flip", K=2, theta=2)
    clock = anm.model_clock(model)
    ref = {k: v.clone().numpy() for k, v in model[0].state_dict().items()}
    model.cuda()
    x = torch.randn(8, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    gy = torch.randn_like(y)
    y.backward(gy)
    anm.step(model)
    gw = (gy.t() @ x.to(torch.bfloat16)).float().cpu().numpy()  # the bf16 GEMM backward computed
    ops.vote(ref, gw, (40, 96), clock.scheme)
    for k, v in model[0].state_dict().items():
        assert_same(v, ref[k], f"bf16 vote {k}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rule", ["carry", "flip"])
def test_graphed_step_gives_the_eager_integers(rule):
    """GraphedStep replays the same kernels as eager steps: bit-identical state after several steps."""
    from arbs import nn as anm

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(96, 128, bias=False), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False))
        anm.ternarize_(m, "E1TM32", rule, K=2, **({"theta": 2} if rule == "flip" else {}))
        return m.cuda()

    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(16, 96, device="cuda", generator=gen), torch.randint(0, 64, (16,), device="cuda", generator=gen))
               for _ in range(5)]
    loss_fn = lambda m: (lambda x, y: torch.nn.functional.cross_entropy(m(x).float(), y))  # noqa: E731
    eager, graphed_model = make(), make()
    losses = []
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = loss_fn(eager)(x, y)
        loss.backward()
        anm.step(eager)
        losses.append(loss.item())
    g = anm.GraphedStep(graphed_model, loss_fn(graphed_model), *batches[0])
    assert anm.model_clock(graphed_model).step_counter == 0, "warm-up steps must be undone"
    glosses = [g(x, y).item() for x, y in batches]
    assert glosses == losses
    assert anm.model_clock(graphed_model).step_counter == 5
    assert anm.model_clock(graphed_model).stats == anm.model_clock(eager).stats
    for (k, a), (_, b) in zip(eager.state_dict().items(), graphed_model.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs between eager and graphed steps"


@pytest.mark.gpu
@needs_cuda
def test_graphed_step_refuses_the_average_rule():
    from arbs import nn as anm
    from arbs.errors import ConfigError

    m = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    anm.ternarize_(m, "E1TM8", "average")
    m.cuda()
    with pytest.raises(ConfigError, match="carry or flip"):
        anm.GraphedStep(m, lambda x: m(x).sum(), torch.randn(2, 8, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_cli_train_on_cuda_resumes_on_cpu_and_fuses(tmp_path):
    """A run saved on the GPU (CUDA graph steps, bf16) has the CPU layout: it resumes, evals and fuses on the CPU."""
    from click.testing import CliRunner

    from arbs import store
    from arbs_cli.main import main

    run = str(tmp_path / "run")
    common = ["--format", "E1TM32", "--preset", "tiny", "--batch-size", "4", "--context", "32", "--eval-every", "3",
              "--eval-batches", "2", "--save-every", "3", "--out", run]
    r = CliRunner().invoke(main, ["train", *common, "--steps", "6", "--device", "cuda", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["steps"] == 6 and math.isfinite(doc["val_loss"])
    r = CliRunner().invoke(main, ["train", *common, "--steps", "9", "--device", "cpu", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    ck = store.open_checkpoint(run)
    assert ck.step_counter == 9 and ck.rule == "flip"
    assert all(not np.issubdtype(a.dtype, np.floating) for t in ck.tensors.values() for a in t.arrays.values())
    r = CliRunner().invoke(main, ["fuse", run, "--out", str(tmp_path / "fused")])
    assert r.exit_code == 0, r.output


# -- the same checks on CPU tensors through Triton's interpreter -----------------------------------
def run_interpreter_checks() -> int:
    """Every check at small shapes; needs TRITON_INTERPRET=1 set before triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    n = 0
    with np.errstate(all="ignore"):  # exp2 overflow to inf and inf*0 are part of the contract
        for gs, rows, cols in INTERP_CASES:
            for check in CHECKS:
                check("cpu", rows * 7919 + cols * 31 + gs, rows, cols, gs)
                n += 1
        for rule in ("average", "carry", "flip"):
            check_module("cpu", 3, 5, 70, "E1TM32", rule)
            n += 1
        check_module("cpu", 4, 3, 13, "E1TM6", "flip")
        check_average_range("cpu")
        check_shared_counters("cpu")
    return n + 3


@pytest.mark.slow  # Triton interpreter subprocess: run by .ci/run's second step (python -m pytest -m slow)
def test_interpreter_matches_numba():
    """The kernels' logic, checked on CPU in a child process with TRITON_INTERPRET=1 (< 30 s)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "interpreter checks passed" in proc.stdout


if __name__ == "__main__":
    print(f"{run_interpreter_checks()} interpreter checks passed")
