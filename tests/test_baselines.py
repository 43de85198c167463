"""Float-latent ternary baselines: forward values, gradient paths, model surgery, diagnostics."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arbs import formats
from arbs.nn import baselines as B
from arbs.errors import ConfigError

TERNARY = [s for s, spec in B.BASELINES.items() if spec.trits is not None]


def test_baselines_implement_exactly_the_float_formats():
    assert tuple(B.BASELINES) == formats.FLOAT_FORMATS


def _weight(shape=(6, 40), seed=0):
    g = np.random.default_rng(seed)
    return torch.tensor(g.normal(0.0, 0.02, size=shape), dtype=torch.float64, requires_grad=True)


# -- numpy twins of each forward value (float64) -------------------------------------------------------


def _np_round(x):
    return np.clip(np.round(x), -1, 1)  # numpy also rounds half to even


def _np_threshold(w, theta):
    th = theta * np.abs(w).mean()
    return np.sign(w) * (np.abs(w) > th), th


def np_forward(scheme, w, *, gs=32, theta=0.5, param=None):
    """(W_q, per-element scale) of the definitions in the task, computed independently of arbs."""
    rows, cols = w.shape
    if scheme == "fp32":
        return w, np.ones_like(w)
    if scheme == "absmean":
        a = np.full_like(w, np.abs(w).mean())
    elif scheme == "absmean-row":
        a = np.repeat(np.abs(w).mean(axis=1, keepdims=True), cols, axis=1)
    elif scheme == "absmax-group":
        a = np.empty_like(w)
        for r in range(rows):
            for c0 in range(0, cols, gs):
                a[r, c0:c0 + gs] = np.abs(w[r, c0:c0 + gs]).max()
    elif scheme == "lsq":
        a = np.full_like(w, param)
    elif scheme == "learned-s":
        t, _ = _np_threshold(w, theta)
        return param * t, np.full_like(w, param)
    elif scheme == "factorized":
        t, _ = _np_threshold(w, theta)
        return w * (t != 0), np.abs(w)
    return a * _np_round(w / a), a


def _param(q):
    ps = dict(q.named_parameters())
    return next(iter(ps.values())).item() if ps else None


@pytest.mark.parametrize("scheme", list(B.BASELINES))
@pytest.mark.parametrize("shape", [(6, 40), (3, 7), (5, 2, 9)])
def test_forward_values_match_definition(scheme, shape):
    w = _weight(shape)
    q = B.make_quantizer(scheme, w, gs=8, threshold=0.5)
    wq = q(w)
    assert wq.shape == w.shape and wq.dtype == w.dtype
    w2 = w.detach().numpy().reshape(shape[0], -1)
    want, a = np_forward(scheme, w2, gs=8, theta=0.5, param=_param(q))
    got = wq.detach().numpy().reshape(w2.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    if B.BASELINES[scheme].trits is not None and scheme != "factorized":
        ratio = np.round(got / a, 9)  # a is numpy's mean, which may differ from torch's in the last bit
        assert set(np.unique(ratio)) <= {-1.0, 0.0, 1.0}
        assert (ratio == 0).any() and (np.abs(ratio) == 1).any()  # a real ternary split, not all one trit


def test_initial_learned_parameters():
    w = _weight()
    a = w.detach().abs()
    on = a > 0.5 * a.mean()
    assert B.make_quantizer("learned-s", w).S.item() == pytest.approx(a[on].mean().item(), rel=1e-12)
    assert B.make_quantizer("lsq", w).alpha.item() == pytest.approx(2 * a.mean().item(), rel=1e-12)
    assert isinstance(B.make_quantizer("lsq", w).alpha, nn.Parameter)
    assert list(B.make_quantizer("absmean", w).parameters()) == []


@pytest.mark.parametrize("scheme", list(B.BASELINES))
def test_all_zero_weight_stays_finite(scheme):
    w = torch.zeros(4, 10, requires_grad=True)
    wq = B.make_quantizer(scheme, w)(w)
    assert torch.equal(wq, torch.zeros_like(wq))
    wq.sum().backward()
    assert torch.isfinite(w.grad).all()


# -- gradient paths ------------------------------------------------------------------------------------


def _backward(scheme, w, seed=1, **opts):
    q = B.make_quantizer(scheme, w, **opts)
    g = torch.tensor(np.random.default_rng(seed).normal(size=tuple(w.shape)), dtype=w.dtype)
    (q(w) * g).sum().backward()
    return q, g


@pytest.mark.parametrize("scheme", ["absmean", "absmean-row", "absmax-group", "fp32"])
def test_ste_passes_gradient_unchanged(scheme):
    w = _weight()
    _, g = _backward(scheme, w, gs=8)
    assert torch.equal(w.grad, g)


def test_factorized_gradient_is_masked():
    w = _weight()
    _, g = _backward("factorized", w, threshold=0.7)
    th = 0.7 * w.detach().abs().mean()
    dead = w.detach().abs() <= th
    assert dead.any() and (~dead).any()
    assert torch.equal(w.grad[dead], torch.zeros_like(w.grad[dead]))
    assert torch.equal(w.grad[~dead], g[~dead])


def test_learned_s_gradients():
    w = _weight()
    q, g = _backward("learned-s", w)
    th = 0.5 * w.detach().abs().mean()
    t = torch.sign(w.detach()) * (w.detach().abs() > th)
    assert q.S.grad.item() == pytest.approx((g * t).sum().item(), rel=1e-12)
    assert torch.equal(w.grad, g)


def test_lsq_gradients_match_paper():
    w = torch.tensor([[-1.3, -0.8, -0.3, -0.24], [0.0, 0.26, 0.7, 1.45]], dtype=torch.float64, requires_grad=True)
    q = B.make_quantizer("lsq", w)
    with torch.no_grad():
        q.alpha.fill_(0.5)
    g = torch.tensor([[0.3, -1.1, 0.7, 2.0], [-0.4, 0.9, 1.3, -0.6]], dtype=torch.float64)
    (q(w) * g).sum().backward()

    wn, gn, alpha = w.detach().numpy(), g.numpy(), 0.5
    x = wn / alpha
    inside = np.abs(x) <= 1
    d_alpha = np.where(inside, np.round(x) - x, np.sign(x))  # LSQ paper: -v/s + round(v/s), or -Qn / Qp
    grad_scale = 1 / math.sqrt(wn.size * 1)
    assert q.alpha.grad.item() == pytest.approx((gn * d_alpha).sum() * grad_scale, rel=1e-12)
    assert (~inside).sum() == 4
    np.testing.assert_array_equal(w.grad.numpy(), np.where(inside, gn, 0.0))
    np.testing.assert_array_equal(q(w).detach().numpy(), alpha * np.clip(np.round(x), -1, 1))


# -- quantize_ on models -------------------------------------------------------------------------------


class _Emb(nn.Embedding):
    def attend(self, x):
        return F.linear(x, self.weight)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = _Emb(11, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))

    def forward(self, idx):
        h = self.wte(idx)
        return self.wte.attend(h + self.mlp(h))


def _tiny():
    torch.manual_seed(0)
    return _Tiny()


IDX = torch.tensor([[1, 2, 3, 4, 10], [0, 5, 6, 7, 8]])


@pytest.mark.parametrize("scheme", TERNARY)
def test_quantize_replaces_layers_and_trains(scheme):
    model = _tiny()
    ref = model(IDX).detach()
    bias, emb_w = model.mlp[0].bias, model.wte.weight
    assert B.quantize_(model, scheme, gs=4) is model
    assert isinstance(model.wte, B.QEmbedding)
    assert isinstance(model.mlp[0], B.QLinear) and isinstance(model.mlp[2], B.QLinear)
    assert model.mlp[0].bias is bias and model.mlp[2].bias is None and model.wte.weight is emb_w

    h = torch.randn(2, 8)
    wq = model.wte.quantizer(model.wte.weight)
    torch.testing.assert_close(model.wte.attend(h), h @ wq.T)
    torch.testing.assert_close(model.wte(IDX), wq[IDX])
    out = model(IDX)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref)  # the forward really uses W_q

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    own = B.BASELINES[scheme].param
    want = [] if own is None else [f"{m}.quantizer.{own}" for m in ("wte", "mlp.0", "mlp.2")]
    assert [n for n in params if "quantizer" in n] == want
    opt = torch.optim.AdamW(
        [{"params": B.latent_parameters(model)}, {"params": B.quantizer_parameters(model), "weight_decay": 0.0}],
        lr=1e-2,
    )
    F.cross_entropy(out.reshape(-1, 11), IDX.reshape(-1)).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), params[n]), f"{n} did not change"


def test_quantize_fp32_leaves_model_and_include_filter():
    model = _tiny()
    before = [type(m) for m in model.modules()]
    B.quantize_(model, "fp32")
    assert [type(m) for m in model.modules()] == before
    B.quantize_(model, "absmean", include=lambda name, m: name != "wte")
    assert type(model.wte) is _Emb and isinstance(model.mlp[0], B.QLinear)


def test_quantize_errors():
    with pytest.raises(ConfigError, match="Did you mean 'absmean'"):
        B.quantize_(_tiny(), "absmaen")
    with pytest.raises(ConfigError, match="Did you mean 'lsq'"):
        B.make_quantizer("lsqq", torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="gs"):
        B.quantize_(_tiny(), "absmax-group", gs=0)
    with pytest.raises(ConfigError, match="threshold"):
        B.quantize_(_tiny(), "learned-s", threshold=-1.0)
    model = B.quantize_(_tiny(), "absmean")
    with pytest.raises(ConfigError, match="already quantized"):
        B.quantize_(model, "lsq")
    with pytest.raises(ConfigError, match="container"):
        B.quantize_(nn.Linear(3, 3), "absmean")


# -- deadzone_stats and inference_bpw ------------------------------------------------------------------

# mean|W| == 1 exactly: a = 1 for absmean, theta_abs = 0.5 for theta = 0.5
# every value dyadic, so mean|W| and theta_abs are exact
W_HAND = np.array([[3.0, -2.0, 0.515625, -0.484375, 0.25, 0.0, -1.0, 0.75]])


@pytest.mark.parametrize(
    "scheme, state, opts, want",
    [
        # x = W/1: +1 {3, .516, .75}, -1 {-2, -1}; near 0.5: {.516, -.484}
        ("absmean", None, {}, (2, 3, 3, 2)),
        ("learned-s", None, {}, (2, 3, 3, 2)),
        # threshold_abs = 0.25: |W| > .25 excludes 0.25 itself (on the boundary -> 0, and near)
        ("factorized", None, {"threshold": 0.25}, (3, 2, 3, 1)),
        # x = W/2: 1.5, -1, .26, -.24, .125, 0, -.5 (half to even -> 0, near), .375
        ("lsq", {"alpha": torch.tensor(2.0)}, {}, (1, 6, 1, 1)),
        # groups of 4: a = 3 then 1: x = 1, -.67, .17, -.16 | .25, 0, -1, .75
        ("absmax-group", None, {"gs": 4}, (2, 4, 2, 0)),
    ],
)
def test_deadzone_stats_hand_case(scheme, state, opts, want):
    s = B.deadzone_stats(scheme, W_HAND, state, **opts)
    n = W_HAND.size
    assert [s["frac_neg"], s["frac_zero"], s["frac_pos"], s["frac_near_boundary"]] == [k / n for k in want]
    assert s["band"] == 0.05


@pytest.mark.parametrize("scheme", TERNARY)
def test_deadzone_stats_agree_with_forward(scheme):
    w = _weight((7, 30), seed=3)
    q = B.make_quantizer(scheme, w, gs=8)
    wq = q(w).detach()
    s = B.deadzone_stats(scheme, w, q.state_dict(), gs=8)
    assert s["frac_neg"] + s["frac_zero"] + s["frac_pos"] == pytest.approx(1.0)
    assert s["frac_neg"] == (wq < 0).double().mean().item()
    assert s["frac_zero"] == (wq == 0).double().mean().item()
    assert 0 < s["frac_near_boundary"] < 0.5
    assert B.deadzone_stats(scheme, w, gs=8, band=0.0)["frac_near_boundary"] == 0.0


@settings(max_examples=25, deadline=None)
@given(
    scheme=st.sampled_from(TERNARY),
    rows=st.integers(1, 4),
    cols=st.integers(1, 13),
    gs=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    zero_frac=st.floats(0, 1),
)
def test_forward_trits_match_stats_property(scheme, rows, cols, gs, seed, zero_frac):
    g = np.random.default_rng(seed)
    w = g.normal(size=(rows, cols)) * (g.random((rows, cols)) >= zero_frac)
    wt = torch.tensor(w, requires_grad=True)
    q = B.make_quantizer(scheme, wt, gs=gs)
    wq = q(wt)
    assert torch.isfinite(wq).all()
    s = B.deadzone_stats(scheme, w, q.state_dict(), gs=gs)
    assert s["frac_neg"] + s["frac_zero"] + s["frac_pos"] == pytest.approx(1.0)
    assert s["frac_pos"] == (wq > 0).double().mean().item()


def test_deadzone_stats_errors():
    with pytest.raises(ConfigError, match="no trits"):
        B.deadzone_stats("fp32", W_HAND)
    with pytest.raises(ConfigError, match="not a parameter"):
        B.deadzone_stats("absmean", W_HAND, {"alpha": 1.0})
    with pytest.raises(ConfigError, match="Did you mean"):
        B.deadzone_stats("factorised", W_HAND)


def test_inference_bpw():
    bpw = {s: B.inference_bpw(s, cols=64, gs=32) for s in B.BASELINES}
    assert bpw == {
        "fp32": 32.0,
        "learned-s": 1.6,
        "absmean": 1.6,
        "absmean-row": 1.6 + 16 / 64,
        "lsq": 1.6,
        "factorized": 16.0,
        "absmax-group": 1.6 + 16 / 32,
    }
    assert B.inference_bpw("absmax-group", cols=64, gs=8) == 1.6 + 2.0
    with pytest.raises(ConfigError, match="cols"):
        B.inference_bpw("absmean", cols=0)
    with pytest.raises(ConfigError, match="Did you mean 'absmean-row'"):
        B.inference_bpw("absmean_row", cols=8)
