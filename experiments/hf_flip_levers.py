"""Levers for flip fine-tuning from a float Hugging Face model (issue 14 item 4), prototyped without touching arbs/.

Runs ``arbs train`` (the product's CLI, every option passed through) with monkeypatches, each off unless asked for.
Since round 4 three of them are in the library: the residual counter start (``ops.convert``), ``--vote-norm 1``
(this script's ``--tensor-norm-all``) and ``--reset R`` (the rule parameter; this script's ``--reset`` is its
prototype, with ``torch.rand`` draws on the tensor-normalized path).

- ``--fa-init residual``: after ``ops.convert`` makes a tensor's step-0 state, set each weight's flip counter
  from where its float value sits between the ternary decision boundaries, instead of 0. (Since round 4
  this is the product's convert rule, formats/SPEC.md section 10, so the option changes nothing there;
  ``--fa-init zero`` sets the counters back to 0, the rule rounds 1-3 ran against.) Convert decides
  ``T = clamp(rint(x), -1, 1)`` with ``x = w / a`` (``a`` = mean|w| of the group), so ``x - T`` is the
  residual the trit leaves (boundaries at ``x - T = +-0.5``); the counter takes it in counter units,
  ``flip_accum = clamp(rint(2 * theta * FA_SCALE * (x - T)), -(theta - 1), theta - 1)``: a weight just
  below a boundary starts ``~theta`` counts from flipping across it, one sitting on its trit starts at 0,
  and a weight beyond +-1.5 a starts saturated (a full 2*theta from flipping back). The state stays
  integer and within the checkpoint's ``|flip_accum| <= theta``.
- ``--reset R``: after a trit moves, its counter becomes ``-R * direction`` (the product: 0), so a trit
  just moved sits R counts from its own boundary back instead of theta: R near theta makes the counter a
  continuous latent across moves, as a float QAT latent is.
- ``--frozen-trits 4096x256``: tensors of that (rows, cols) view keep their step-0 trits (their scales
  still vote): here the token embedding and the head, an ablation of where trit moves cost loss. (On the
  GPU the flips counter still counts their reverted moves.) ``--frozen-index 0,29``: the same by tensor
  index (the model's E1TM tensors in module order: for the 4-layer Llama 0 is the embedding, 29 the head).
- ``--tensor-norm 4096x256``: those tensors' trit votes use the rms of the whole tensor's gradient, not of
  each row's (a torch re-statement of the kernel's update with that one change; its own random draws; on
  the GPU with ``--no-cuda-graph``): an embedding row's gradient is non-zero only for the batch's tokens
  and a head row's is small for rare tokens, and row normalization gives both full-size votes.
- ``--corpus PATH.npz``: the built-in corpus as saved on another machine (``train``, ``val``, ``info``), so
  a GPU machine with another Python standard library trains and evaluates on the same bytes.
- Rounds 15-21 (docs/research/training.md, "where absmean QAT's lead lives"): ``--optim`` swaps the float
  baselines' AdamW for another update of the float latent (``NormalizedSGD``: flip's tensor-rms step, its
  factored / per-weight normalized variants, ``--optim-vocab`` for the embedding and head, ``--optim-clip``);
  on the tensor-normalized flip path ``--vote-normalizer`` (factored or per-weight EMAs of g**2, float
  prototype state) for ``--normalizer-index`` tensors with ``--normalizer-mult``, ``--vote-scale-power``
  (votes on g * S**q), ``--sat`` (counters of +-1 trits past theta); ``--frozen-scales-index`` (a tensor's
  scales keep their converted values) and ``--magnitude-scale-index`` (scale votes weighted by |g| / mean|g|;
  CPU and GPU since round 22). Rounds 22-25: ``--vote-normalizer weight-int`` keeps the per-weight v as an
  integer code (``--v-bits`` per weight on a log grid ``--v-step`` octaves of v apart, relative to the
  tensor's mean g**2; running mean over the first 1/(1-beta) steps since round 25). Round 26:
  ``--normalizer-mult-end`` ramps the factor linearly to that value at the horizon.
- ``--warmup-frac F``: flip's vote schedule (``arbs.schedule.trit_vote_gain``) with a linear warmup over the
  first ``F * horizon`` steps (the product: ``horizon // 20``, F = 0.05), then the same cosine to 0 at the
  horizon.

Everything else is the product's code path: CPU kernels, checkpoints, evals, the fuse phase and the fused
eval. The checkpoints' ``meta["config"]`` records the plain options only; the patches are in this script's
log line, so such a run does not resume bit-exactly with plain ``arbs train``.

    HF_HUB_OFFLINE=1 python experiments/hf_flip_levers.py --fa-init residual -- \
        --model /tmp/hfl/model --format E1TM32 --rule flip --theta 64 --context 128 --steps 300 \
        --eval-every 100 --out /tmp/hfy/t64res --json

Results and the story: docs/research/training.md (flip fine-tuning levers), logs in docs/research/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from arbs import formats, ops, schedule


def patch_zero_init() -> None:
    """flip's step-0 counters 0 (ops.convert before round 4) instead of the float residual."""
    orig = ops.convert

    def convert(w, scheme, *, name="tensor"):
        state, stats = orig(w, scheme, name=name)
        if "flip_accum" in state:
            state["flip_accum"][...] = 0
        return state, stats

    ops.convert = convert


def patch_residual_init(fa_scale: float = 1.0) -> None:
    orig = ops.convert

    def convert(w, scheme, *, name="tensor"):
        state, stats = orig(w, scheme, name=name)
        if "flip_accum" not in state:
            return state, stats
        theta = scheme.params["theta"]
        w = np.asarray(w, np.float64)
        rows, cols = formats.tensor_view(w.shape)
        gs = scheme.gs
        cols_p = formats.padded_cols(cols, gs)
        ng = cols_p // gs
        wp = np.zeros((rows, cols_p), np.float64)
        wp[:, :cols] = w.reshape(rows, cols)
        n_real = np.zeros((rows, cols_p))
        n_real[:, :cols] = 1
        a = np.abs(wp).reshape(rows, ng, gs).sum(2) / np.maximum(n_real.reshape(rows, ng, gs).sum(2), 1)
        safe = np.where(a > 0, a, 1.0)
        x = wp / np.repeat(safe, gs, axis=1)
        T = ops.unpack(state["T_packed"], cols_p).astype(np.float64)
        fa = np.rint(2.0 * theta * fa_scale * (x - T))
        fa = np.clip(fa, -(theta - 1), theta - 1)
        fa[:, cols:] = 0  # padding is never voted on
        fa[np.repeat(a == 0, gs, axis=1)] = 0
        state["flip_accum"] = fa.astype(np.int8)
        return state, stats

    ops.convert = convert


def patch_warmup(frac: float) -> None:
    def trit_vote_gain(params, step_counter):
        gain, horizon = params.get("gain", 0), params.get("horizon", 0)
        if gain == 0:
            return 0.0
        if horizon == 0:
            return float(gain)
        warmup = max(1, int(horizon * frac))
        if step_counter < warmup:
            return gain * (step_counter + 1) / warmup
        f = min(1.0, (step_counter - warmup) / max(1, horizon - warmup))
        return gain * 0.5 * (1.0 + math.cos(math.pi * f))

    schedule.trit_vote_gain = trit_vote_gain


RESET = [0]  # --reset R, also used by the tensor-normalized update
NORM_INDEX: set = set()  # --normalizer-index: the tensors --vote-normalizer applies to (empty: every tensor)
NORM_MULT = [1.0]  # --normalizer-mult: the gain's factor on those tensors
NORM_MULT_END = [None]  # --normalizer-mult-end: the factor at the horizon (linear from --normalizer-mult)
PROGRESS = [0.0]  # step_counter / horizon of the vote being made (for --normalizer-mult-end)
EXCESS: dict = {}  # --sat: per tensor, each counter's part beyond +-theta
SAT = [0]  # --sat S: counters of +1 (-1) trits clamp at +S (-S) instead of +-theta
NORMALIZER = ["tensor"]  # --vote-normalizer: tensor rms, factored (this step's row x column), factored-ema
EMA: dict = {}  # factored-ema: per tensor, the row and column EMAs of g**2 (float: a prototype's state)
EMA_BETA = [0.999]
VBITS = [4]  # weight-int: bits of each weight's code
VSTEP = [2.0]  # weight-int: log2 v between two codes
VTOP = 4.0  # weight-int: log2 of the top code's v relative to the tensor's mean g**2
SPOWER = [0.0]  # --vote-scale-power q: the tensor-normalized vote on g * S**q (S = the group's 2**(E+Xi))
POWER = [1.0]  # --vote-power P: the tensor-normalized update's a = gain * (|g| / rms) ** P


def patch_reset(R: int) -> None:
    """After a trit moves, set its counter to ``-R * (direction of the move)`` instead of 0 (the product):
    R = 0 is the product's full hysteresis (a moved trit needs theta counts to move back); R -> theta - 1
    keeps the counter continuous across the move, as a float latent weight is (the new trit sits right at
    the boundary it just crossed, so a few opposite votes move it back). Wraps the CPU vote
    (``ops.vote_unchecked``) and the GPU one (``arbs.nn.cuda.vote_async``): T before and after the vote are
    compared and the moved positions' counters rewritten; everything else is the product's kernel."""
    RESET[0] = R
    if R == 0:
        return
    orig = ops.vote_unchecked

    def vote_unchecked(state, g2, scheme, **kw):
        if "flip_accum" not in state:
            return orig(state, g2, scheme, **kw)
        if R >= scheme.params["theta"]:
            raise SystemExit(f"--reset {R} must be below theta {scheme.params['theta']}")
        before = state["T_packed"].copy()
        st = orig(state, g2, scheme, **kw)
        if st.flips:
            fa = state["flip_accum"]
            cols_p = fa.shape[1]
            d = ops.unpack(state["T_packed"], cols_p).astype(np.int16) - ops.unpack(before, cols_p)
            moved = d != 0
            fa[moved] = (-R * d[moved]).astype(np.int8)
        return st

    ops.vote_unchecked = vote_unchecked

    try:
        import torch

        from arbs.nn import cuda
    except ImportError:  # no GPU support installed: the CPU wrapper is enough
        return
    orig_async = cuda.vote_async

    def vote_async(layer, grad):
        if not hasattr(layer, "flip_accum") or layer.flip_accum is None:
            return orig_async(layer, grad)
        before = layer.T_packed.clone()
        counters = orig_async(layer, grad)
        fa = layer.flip_accum
        d = _trits(layer.T_packed, fa.shape[1]) - _trits(before, fa.shape[1])
        fa.copy_(torch.where(d != 0, (-R * d).to(torch.int8), fa))
        return counters

    cuda.vote_async = vote_async


def _trits(tp, cols_p: int):
    """The trits (int16, rows x cols_p) of a packed torch uint8 array, on its device."""
    import torch

    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=tp.device)
    t = (tp.to(torch.int16).unsqueeze(-1) // pow3) % 3 - 1
    return t.reshape(tp.shape[0], -1)[:, :cols_p]


def _chosen(view, index, shapes, indices, every=False) -> bool:
    """Whether a tensor of (rows, cols) ``view`` and model-order ``index`` is one a patch applies to."""
    return every or tuple(view) in shapes or index in indices


TRITS, SCALES = ("T_packed", "flip_accum"), ("E", "corr_accum")


def _kept(orig, names, state, g2, scheme, **kw):
    """The product's CPU vote (``orig``) with the arrays ``names`` put back afterwards (``TRITS``: only the
    scales' votes stay; ``SCALES``: only the trits')."""
    saved = {n: state[n].copy() for n in names}
    st = orig(state, g2, scheme, **kw)
    for n, a in saved.items():
        state[n][...] = a
    return st


def _kept_async(orig_async, names, layer, grad):
    """The GPU twin of :func:`_kept` (``arbs.nn.cuda.vote_async``)."""
    saved = {n: getattr(layer, n).clone() for n in names}
    counters = orig_async(layer, grad)
    for n, a in saved.items():
        getattr(layer, n).copy_(a)
    return counters


def patch_frozen_trits(shapes: list[tuple[int, int]], indices: list[int] = ()) -> None:
    """Tensors of these (rows, cols) shapes keep their trits and counters (their scales still vote, as
    carry's do): an ablation that says which tensors' trit moves cost loss. Wraps the same two functions
    as :func:`patch_reset` (apply after it)."""
    if not shapes and not indices:
        return
    orig = ops.vote_unchecked

    def vote_unchecked(state, g2, scheme, **kw):
        if "flip_accum" not in state or not _chosen(g2.shape, kw.get("tensor"), shapes, indices):
            return orig(state, g2, scheme, **kw)
        st = _kept(orig, TRITS, state, g2, scheme, **kw)
        return type(st)(st.carries, st.saturations, 0)

    ops.vote_unchecked = vote_unchecked
    try:
        from arbs import formats as F
        from arbs.nn import cuda
    except ImportError:
        return
    orig_async = cuda.vote_async

    def vote_async(layer, grad):
        if getattr(layer, "flip_accum", None) is None \
                or not _chosen(F.tensor_view(layer.shape), layer.tensor_index, shapes, indices):
            return orig_async(layer, grad)
        return _kept_async(orig_async, TRITS, layer, grad)

    cuda.vote_async = vote_async


def _group_scale(w_eff, cols_p: int, gs: int):
    """Each element's group scale S = 2**(E + Xi) from W_eff (rows, cols): the group's max |W_eff| (every non-zero
    trit of a group is +-S); 0 for a group of zero trits."""
    import torch

    rows, cols = w_eff.shape
    w = torch.zeros((rows, cols_p), dtype=torch.float32, device=w_eff.device)
    w[:, :cols] = w_eff.float().abs()
    s = w.reshape(rows, cols_p // gs, gs).amax(-1, keepdim=True).expand(rows, cols_p // gs, gs)
    return s.reshape(rows, cols_p)[:, :cols]


def _int_v(key, g2):
    """Each weight's EMA of g**2 relative to the tensor's mean g**2, kept as an integer code c per weight
    (VBITS bits: 0 .. 2**VBITS - 1) on a log grid, v_rel = 2**(VTOP - VSTEP * (L - 1 - c)) (code 0 the floor):
    this step's v_rel = beta_t * v_rel + (1 - beta_t) * g**2 / mean(g**2), beta_t = min(beta, 1 - 1/t) (the
    running mean of the first steps, as Adam's bias correction gives; t the tensor's vote count),
    rounded stochastically to one of its two neighbouring levels with probabilities that keep it unbiased in
    v. Returns the new v_rel (float, g2's shape); the codes are prototype state in EMA[key]["c"]."""
    import torch

    L = 2 ** VBITS[0]
    levels = torch.pow(2.0, VTOP - VSTEP[0] * torch.arange(L - 1, -1, -1, dtype=torch.float32, device=g2.device))
    z = g2 / g2.mean().clamp_min(1e-30)
    st = EMA.setdefault(key, {"t": 0})
    st["t"] += 1
    beta = min(EMA_BETA[0], 1 - 1 / st["t"])  # the running mean until 1 / (1 - beta) steps: Adam's bias correction
    x = z if st["t"] == 1 else beta * levels[st["c"].long()] + (1 - beta) * z
    x = x.clamp(float(levels[0]), float(levels[-1]))
    hi = torch.searchsorted(levels, x.contiguous()).clamp(1, L - 1)  # levels[hi - 1] <= x <= levels[hi]
    lo_v, hi_v = levels[hi - 1], levels[hi]
    up = torch.rand(x.shape, device=x.device) < (x - lo_v) / (hi_v - lo_v)
    st["c"] = torch.where(up, hi, hi - 1).to(torch.uint8)
    return levels[st["c"].long()]


def _tensor_norm_flip(T_packed, fa, g, *, theta: int, vote_max: int, gain_m: float, gen=None, S=None, key=None) -> None:
    """flip's trit update in torch with the vote magnitude normalized by the rms of the whole tensor's
    gradient instead of its row's: a = min(vote_max, gain_m * |g| / rms(g over the tensor)), k its stochastic
    rounding, counter += -sign(g) * k, trit moves at +-theta (counter to -+RESET: --reset), as the product's
    kernel otherwise does. In place on T_packed (uint8 (rows, nb)) and fa (int8 (rows, cols_p)); g (rows, cols)."""
    import torch

    rows, nb = T_packed.shape
    cols_p = fa.shape[1]
    cols = g.shape[1]
    g = g.float()
    if S is not None and SPOWER[0] != 0.0:  # --vote-scale-power q: vote on g * S**q (0-scale groups: S of 1)
        S = torch.where(S > 0, S, torch.ones_like(S))
        g = g * S.pow(SPOWER[0])
    rms = g.pow(2).mean().sqrt()
    if not math.isfinite(float(rms)) or float(rms) == 0.0:  # a host sync: run with --no-cuda-graph on a GPU
        return
    if NORMALIZER[0] == "tensor" or (NORM_INDEX and key not in NORM_INDEX):
        a = torch.clamp(gain_m * (g.abs() / rms.clamp_min(1e-30)) ** POWER[0], max=float(vote_max))
    else:  # each weight's |g| against sqrt(v), v an estimate of its g**2
        g2 = g.pow(2)
        if NORMALIZER[0] == "weight-ema":  # each weight's own EMA of g**2 (Adam's v)
            st = EMA.setdefault(key, {"v": torch.zeros_like(g), "t": 0})
            st["t"] += 1
            st["v"].mul_(EMA_BETA[0]).add_(g2, alpha=1 - EMA_BETA[0])
            v = st["v"] / (1 - EMA_BETA[0] ** st["t"])
        elif NORMALIZER[0] == "weight-int":  # the same v kept as an integer code per weight (--v-bits, --v-step)
            v = _int_v(key, g2) * g2.mean()
        else:  # factored: v = r_i * c_j / mean r, r / c the row / column mean of g**2 (or their EMAs)
            r, c = g2.mean(1), g2.mean(0)
            if NORMALIZER[0] == "factored-ema":
                st = EMA.setdefault(key, {"r": torch.zeros_like(r), "c": torch.zeros_like(c), "t": 0})
                st["t"] += 1
                st["r"].mul_(EMA_BETA[0]).add_(r, alpha=1 - EMA_BETA[0])
                st["c"].mul_(EMA_BETA[0]).add_(c, alpha=1 - EMA_BETA[0])
                bc = 1 - EMA_BETA[0] ** st["t"]
                r, c = st["r"] / bc, st["c"] / bc
            v = r[:, None] * c[None, :] / r.mean().clamp_min(1e-30)
        z = torch.where(v > 0, g.abs() / v.clamp_min(1e-30).sqrt(), torch.zeros_like(g))
        mult = NORM_MULT[0] if NORM_MULT_END[0] is None else NORM_MULT[0] + (NORM_MULT_END[0] - NORM_MULT[0]) * PROGRESS[0]
        a = torch.clamp(gain_m * mult * z ** POWER[0], max=float(vote_max))
    u = torch.rand(a.shape, device=a.device, generator=gen)
    k = torch.floor(a) + (u < a - torch.floor(a)).float()
    r = torch.zeros((rows, cols_p), dtype=torch.int32, device=g.device)
    r[:, :cols] = (-torch.sign(g) * k).to(torch.int32)
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=T_packed.device)
    t = ((T_packed.to(torch.int16).unsqueeze(-1) // pow3) % 3 - 1).reshape(rows, nb * 5)
    T = t[:, :cols_p].to(torch.int32)
    v = fa.to(torch.int32) + r
    if SAT[0] > theta:  # --sat: a counter at the extreme trit may run on to +-SAT (more votes to move it back);
        # the part beyond +-theta lives in EXCESS (prototype state), so flip_accum keeps the checkpoint's range
        if key not in EXCESS:
            EXCESS[key] = torch.zeros_like(v)
        v = v + EXCESS[key]
        hi = torch.where(T == 1, SAT[0], theta)
        lo = torch.where(T == -1, -SAT[0], -theta)
        v = torch.maximum(torch.minimum(v, hi), lo)
    else:
        v = torch.clamp(v, -theta, theta)
    up = (v >= theta) & (T < 1)
    down = (v <= -theta) & (T > -1)
    T = T + up.to(torch.int32) - down.to(torch.int32)
    v = torch.where(up, torch.full_like(v, -RESET[0]), torch.where(down, torch.full_like(v, RESET[0]), v))
    if SAT[0] > theta:
        inside = torch.clamp(v, -theta, theta)
        EXCESS[key] = (v - inside).to(torch.int32)
        v = inside
    fa.copy_(v.to(torch.int8))
    t = t.to(torch.int32)
    t[:, :cols_p] = T
    packed = ((t.reshape(rows, nb, 5) + 1) * pow3.to(torch.int32)).sum(-1)
    T_packed.copy_(packed.to(torch.uint8))


def patch_tensor_norm(shapes: list[tuple[int, int]], indices: list[int] = (), every: bool = False) -> None:
    """Tensors of these shapes / indices (every E1TM tensor with ``every``) vote their trits with
    tensor-rms-normalized magnitudes (:func:`_tensor_norm_flip`); their scales vote as the product's. CPU and
    GPU (pass --no-cuda-graph on the GPU: the gain is read on the host)."""
    if not shapes and not indices and not every:
        return
    import torch

    orig = ops.vote_unchecked

    def vote_unchecked(state, g2, scheme, **kw):
        if "flip_accum" not in state or not _chosen(g2.shape, kw.get("tensor"), shapes, indices, every):
            return orig(state, g2, scheme, **kw)
        before = state["T_packed"].copy()
        st = _kept(orig, TRITS, state, g2, scheme, **kw)
        gain_m = schedule.trit_vote_gain(scheme.params, kw["step_counter"])
        PROGRESS[0] = min(1.0, kw["step_counter"] / max(1, scheme.params.get("horizon", 0)))
        if gain_m <= 0:
            return type(st)(st.carries, st.saturations, 0)
        S = None
        if SPOWER[0] != 0.0:
            w2 = np.empty(g2.shape, np.float32)
            ops.materialize_unchecked(state, scheme, kw["step_counter"], w2)
            S = _group_scale(torch.from_numpy(w2), state["flip_accum"].shape[1], scheme.gs)
        _tensor_norm_flip(torch.from_numpy(state["T_packed"]), torch.from_numpy(state["flip_accum"]),
                          torch.from_numpy(np.ascontiguousarray(g2)), theta=scheme.params["theta"],
                          vote_max=scheme.params["vote_max"], gain_m=gain_m, S=S, key=kw.get("tensor"))
        cols_p = state["flip_accum"].shape[1]
        flips = int((ops.unpack(state["T_packed"], cols_p) != ops.unpack(before, cols_p)).sum())
        return type(st)(st.carries, st.saturations, flips)

    ops.vote_unchecked = vote_unchecked
    try:
        from arbs import formats as F
        from arbs.nn import cuda
    except ImportError:
        return
    orig_async = cuda.vote_async

    def vote_async(layer, grad):
        if getattr(layer, "flip_accum", None) is None \
                or not _chosen(F.tensor_view(layer.shape), layer.tensor_index, shapes, indices, every):
            return orig_async(layer, grad)
        counters = _kept_async(orig_async, TRITS, layer, grad)
        scheme = layer.clock.scheme
        gain_m = schedule.trit_vote_gain(scheme.params, layer.clock.step_counter)
        PROGRESS[0] = min(1.0, layer.clock.step_counter / max(1, scheme.params.get("horizon", 0)))
        if gain_m > 0:
            rows, cols = F.tensor_view(layer.shape)
            S = None
            if SPOWER[0] != 0.0:
                S = _group_scale(layer.materialize(torch.float32).reshape(rows, cols), layer.flip_accum.shape[1],
                                 scheme.gs)
            _tensor_norm_flip(layer.T_packed, layer.flip_accum, grad.detach().reshape(rows, cols),
                              theta=scheme.params["theta"], vote_max=scheme.params["vote_max"], gain_m=gain_m, S=S,
                              key=layer.tensor_index)
        return counters

    cuda.vote_async = vote_async


OPTIMS = ("adam", "adam-b1-0", "adam-clamp", "nsgd", "nsgd-m", "nsgd-f", "adafactor", "rmsprop")


class NormalizedSGD:
    """Prototype optimizer for the float-latent baselines (``--optim``), per parameter one of: ``nsgd`` steps
    ``-lr * mult * g / rms(g over the tensor)`` (flip's tensor-normalized vote on a float latent), ``nsgd-m``
    the same on g's heavy-ball momentum (beta 0.9), ``nsgd-f`` divides g by sqrt(r_i c_j / mean r) of this
    step's row / column means of g**2, ``adafactor`` by that of their EMAs (beta 0.999, bias-corrected; no
    momentum), ``rmsprop`` by the EMA of g**2 itself (Adam without momentum). AdamW's lr schedule throughout.
    ``clip``: each normalized update at +-clip. ``vocab_kind``: the kind of the (vocab, d) tensors (the
    embedding and the head), when not ``None``."""

    def __init__(self, groups, lr, kind, mult, clip=0.0, vocab_kind=None, vocab_rows=4096):
        import torch

        self.param_groups = [dict(g, lr=lr) for g in groups]
        self.kind, self.mult, self.clip = kind, mult, clip
        self.vocab_kind, self.vocab_rows = vocab_kind, vocab_rows
        self.buf, self.state = {}, {}
        self._torch = torch

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def _ema(self, p, name, x, beta=0.999):
        st = self.buf.setdefault(p, {})
        if name not in st:
            st[name], st["n_" + name] = self._torch.zeros_like(x), 0
        st["n_" + name] += 1
        st[name].mul_(beta).add_(x, alpha=1 - beta)
        return st[name] / (1 - beta ** st["n_" + name])

    def _update(self, p, d, kind):
        torch = self._torch
        if kind == "nsgd-m":
            d = self._ema(p, "m", d, 0.9)
        if kind in ("nsgd-f", "adafactor") and d.ndim == 2:
            g2 = d.float().pow(2)
            r, c = g2.mean(1), g2.mean(0)
            if kind == "adafactor":
                r, c = self._ema(p, "r", r), self._ema(p, "c", c)
            v = r[:, None] * c[None, :] / r.mean().clamp_min(1e-30)
        elif kind == "rmsprop":
            v = self._ema(p, "v", d.float().pow(2))
        else:
            v = d.pow(2).mean().expand_as(d)
        return torch.where(v > 0, d / v.clamp_min(1e-30).sqrt(), torch.zeros_like(d))

    def step(self):
        torch = self._torch
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    vocab = self.vocab_kind and p.ndim == 2 and p.shape[0] == self.vocab_rows
                    u = self._update(p, p.grad, self.vocab_kind if vocab else self.kind)
                    if self.clip:
                        u = u.clamp(-self.clip, self.clip)
                    p.add_(u, alpha=-g["lr"] * self.mult)


def patch_optim(kind: str, mult: float, clip: float = 0.0, vocab_kind: str | None = None) -> None:
    """Swap the float baselines' AdamW (``arbs.training.build``) for a prototype: ``adam-b1-0`` (AdamW without
    momentum), ``nsgd`` / ``nsgd-m`` (NormalizedSGD above)."""
    import torch

    orig = torch.optim.AdamW

    def make(groups, lr):
        if kind == "adam-b1-0":
            return orig(groups, lr=lr * mult, betas=(0.0, 0.999))
        if kind == "adam-clamp":  # AdamW, then each 2-D latent clamped to +-1.5 mean|w| (flip's bounded counter)
            opt = orig(groups, lr=lr * mult)
            step = opt.step

            def clamped_step(*a, **k):
                out = step(*a, **k)
                with torch.no_grad():
                    for g in opt.param_groups:
                        for p in g["params"]:
                            if p.ndim == 2:
                                lim = 1.5 * p.abs().mean()
                                p.clamp_(-lim, lim)
                return out

            opt.step = clamped_step
            return opt
        return NormalizedSGD(groups, lr, kind, mult, clip=clip, vocab_kind=vocab_kind)

    torch.optim.AdamW = make


def patch_frozen_scales(indices: list[int]) -> None:
    """Tensors of these model-order indices keep their step-0 scales (E, corr_accum) while their trits vote as
    before: an ablation of what the scale votes do there. Wraps the CPU and GPU votes (apply after every other
    patch)."""
    if not indices:
        return
    orig = ops.vote_unchecked

    def vote_unchecked(state, g2, scheme, **kw):
        if kw.get("tensor") not in indices:
            return orig(state, g2, scheme, **kw)
        st = _kept(orig, SCALES, state, g2, scheme, **kw)
        return type(st)(0, 0, st.flips)

    ops.vote_unchecked = vote_unchecked
    try:
        from arbs.nn import cuda
    except ImportError:
        return
    orig_async = cuda.vote_async

    def vote_async(layer, grad):
        if layer.tensor_index not in indices:
            return orig_async(layer, grad)
        return _kept_async(orig_async, SCALES, layer, grad)

    cuda.vote_async = vote_async


def _size_weighted_scale_votes(g, T, gs: int, cols_p: int, cap: int):
    """Each group's scale vote ``-sum_j sign(g_j) * T_j * k_j``, ``k_j`` the stochastic rounding of
    ``min(cap, |g_j| / mean|g| over the tensor)``; g (rows, cols) float, T (rows, cols) the trits the vote
    counts. Returns int64 (rows, cols_p // gs) on g's device, or None for a gradient of zeros."""
    import torch

    mean = g.abs().mean()
    if float(mean) == 0.0:  # a host sync: run with --no-cuda-graph on a GPU
        return None
    rows, cols = g.shape
    a = torch.clamp(g.abs() / mean, max=float(cap))
    k = torch.floor(a) + (torch.rand(a.shape, device=g.device) < a - torch.floor(a)).float()
    v = torch.zeros((rows, cols_p), device=g.device)
    v[:, :cols] = -torch.sign(g) * T.float() * k
    return v.reshape(rows, cols_p // gs, gs).sum(-1).to(torch.int64)


def patch_magnitude_scale_votes(indices: list[int], every: bool, cap: int = 8) -> None:
    """Those tensors' scale votes weigh each weight by its gradient's size (:func:`_size_weighted_scale_votes`:
    a mean weight of about 1, as the product's ``-sum sign(g) T`` gives every weight, but a rare row's tiny
    gradient next to nothing) instead of the product's magnitude-blind count. Same carry into E
    (``apply_votes``). CPU and GPU (pass --no-cuda-graph on the GPU)."""
    if not indices and not every:
        return
    import torch

    from arbs.kernels import cpu

    orig = ops.vote_unchecked

    def vote_unchecked(state, g2, scheme, **kw):
        if not (every or kw.get("tensor") in indices):
            return orig(state, g2, scheme, **kw)
        tp = state["T_packed"].copy()  # the trits this step's scale votes count
        st = _kept(orig, SCALES, state, g2, scheme, **kw)
        carries = sats = 0
        if kw.get("scales", True):
            g = torch.from_numpy(np.ascontiguousarray(g2)).float()
            cols_p = state["flip_accum"].shape[1] if "flip_accum" in state else formats.padded_cols(g.shape[1],
                                                                                                    scheme.gs)
            T = torch.from_numpy(ops.unpack(tp, cols_p)[:, :g.shape[1]].astype(np.float32))
            delta = _size_weighted_scale_votes(g, T, scheme.gs, cols_p, cap)
            if delta is not None:
                corr = state["corr_accum"]
                carries, sats = cpu.kernel("apply_votes", corr.size * 16)(corr, state["E"], delta.numpy(),
                                                                          scheme.carry_limit)
        return type(st)(carries, sats, st.flips)

    ops.vote_unchecked = vote_unchecked
    try:
        from arbs import formats as F
        from arbs.kernels import triton_gpu
        from arbs.nn import cuda
    except ImportError:
        return
    orig_async = cuda.vote_async

    def vote_async(layer, grad):
        if not (every or layer.tensor_index in indices):
            return orig_async(layer, grad)
        tp = layer.T_packed.clone()
        counters = _kept_async(orig_async, SCALES, layer, grad)
        if not layer.clock.fuse_phase:
            rows, cols = F.tensor_view(layer.shape)
            cols_p = layer.corr_accum.shape[1] * layer.clock.scheme.gs
            delta = _size_weighted_scale_votes(grad.detach().reshape(rows, cols).float(), _trits(tp, cols_p)[:, :cols],
                                               layer.clock.scheme.gs, cols_p, cap)
            if delta is not None:
                triton_gpu.launch_apply(layer.corr_accum, layer.E, delta, layer.clock.scheme.carry_limit, counters,
                                        guarded=True)
        return counters

    cuda.vote_async = vote_async


def patch_corpus(path: str) -> None:
    """Make ``data.default_corpus()`` return the corpus saved in ``path`` (np.savez: train, val, info as
    JSON bytes): the same bytes on a machine whose Python standard library differs."""
    import json

    from arbs import data

    z = np.load(path)
    corpus = data.Corpus(z["train"], z["val"], json.loads(bytes(z["info"]).decode()))
    data.default_corpus = lambda *a, **k: corpus


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fa-init", choices=("product", "zero", "residual"), default="product",
                    help="flip's step-0 counters: the product's convert rule (the residual since round 4), 0, or "
                         "this script's residual (with --fa-scale)")
    ap.add_argument("--fa-scale", type=float, default=1.0, help="residual init: counters = scale * 2*theta*(x-T)")
    ap.add_argument("--warmup-frac", type=float, default=None, help="vote-gain warmup as a fraction of horizon")
    ap.add_argument("--reset", type=int, default=0, help="counter after a trit moves: -R*direction (product: 0)")
    ap.add_argument("--frozen-trits", default="", help="ROWSxCOLS,... tensors whose trits never move")
    ap.add_argument("--frozen-index", default="", help="tensor indices (model order; Llama: 0 = embedding, "
                    "last = head) whose trits never move")
    ap.add_argument("--tensor-norm", default="", help="ROWSxCOLS,... tensors whose trit votes are normalized by "
                    "the tensor's gradient rms instead of the row's")
    ap.add_argument("--tensor-norm-index", default="", help="the same by tensor index (29: the Llama's head)")
    ap.add_argument("--tensor-norm-all", action="store_true", help="every tensor's trit votes tensor-normalized")
    ap.add_argument("--vote-power", type=float, default=1.0, help="tensor-normalized votes: gain * (|g|/rms) ** P "
                    "(P < 1 narrows the range between weights with small and large gradients, toward Adam's)")
    ap.add_argument("--vote-scale-power", type=float, default=0.0, help="tensor-normalized votes on g * S**q, S the "
                    "group's scale 2**(E+Xi) (q 1: each flip's first-order loss change; -1: a weight-space step)")
    ap.add_argument("--vote-normalizer", choices=("tensor", "factored", "factored-ema", "weight-ema", "weight-int"),
                    default="tensor",
                    help="tensor-normalized path: |g| against the tensor's rms, or sqrt(r_i c_j / mean r) of this "
                         "step's (factored) or EMA'd (factored-ema) row / column means of g**2, or sqrt of each weight's own EMA "
                         "of g**2 (weight-ema: Adam's v, float state, a prototype only; weight-int: the same v in an "
                         "integer code of --v-bits per weight)")
    ap.add_argument("--v-bits", type=int, default=4, help="weight-int: bits of each weight's v code")
    ap.add_argument("--v-step", type=float, default=2.0, help="weight-int: log2 v between two codes")
    ap.add_argument("--ema-beta", type=float, default=0.999, help="factored-ema's beta")
    ap.add_argument("--normalizer-index", default="", help="--vote-normalizer for these tensor indices only "
                    "(Llama: 0 embedding, last head); the tensor rms elsewhere")
    ap.add_argument("--normalizer-mult", type=float, default=1.0, help="gain factor where --vote-normalizer applies")
    ap.add_argument("--normalizer-mult-end", type=float, default=None, help="that factor at the horizon, linear "
                    "from --normalizer-mult at step 0")
    ap.add_argument("--frozen-scales-index", default="", help="tensor indices whose scales (E, corr_accum) keep "
                    "their step-0 values (Llama: 29 the head)")
    ap.add_argument("--magnitude-scale-index", default="", help="tensor indices whose scale votes weigh each "
                    "weight by |g| / mean|g| (stochastically rounded, at most 8)")
    ap.add_argument("--magnitude-scale-all", action="store_true", help="--magnitude-scale-index for every tensor")
    ap.add_argument("--sat", type=int, default=0, help="tensor-normalized path: counters of +1 / -1 trits run "
                    "on to +-SAT (<= 127) instead of stopping at +-theta")
    ap.add_argument("--corpus", default=None, help="an .npz of the built-in corpus (train, val, info) to use as it")
    ap.add_argument("--optim", choices=OPTIMS, default="adam",
                    help="float baselines' optimizer: the product's AdamW or a prototype (patch_optim)")
    ap.add_argument("--optim-vocab", choices=OPTIMS[3:], default=None, help="--optim: another kind for the "
                    "(4096, d) tensors (embedding, head)")
    ap.add_argument("--optim-mult", type=float, default=1.0, help="--optim: lr multiplier")
    ap.add_argument("--optim-clip", type=float, default=0.0, help="nsgd/adafactor: clamp each normalized update "
                    "at +-C (flip's vote_max/gain)")
    a = ap.parse_args(argv)
    if a.optim != "adam":
        patch_optim(a.optim, a.optim_mult, a.optim_clip, a.optim_vocab)
    POWER[0] = a.vote_power
    SPOWER[0] = a.vote_scale_power
    NORMALIZER[0], EMA_BETA[0] = a.vote_normalizer, a.ema_beta
    VBITS[0], VSTEP[0] = a.v_bits, a.v_step
    SAT[0] = a.sat
    NORM_INDEX.update(int(x) for x in a.normalizer_index.split(",") if x)
    NORM_MULT[0], NORM_MULT_END[0] = a.normalizer_mult, a.normalizer_mult_end
    if a.corpus:
        patch_corpus(a.corpus)
    if a.fa_init == "residual":
        patch_residual_init(a.fa_scale)
    elif a.fa_init == "zero":
        patch_zero_init()
    if a.warmup_frac is not None:
        patch_warmup(a.warmup_frac)
    patch_reset(a.reset)
    patch_frozen_trits([tuple(int(v) for v in x.split("x")) for x in a.frozen_trits.split(",") if x],
                       [int(x) for x in a.frozen_index.split(",") if x])
    patch_tensor_norm([tuple(int(v) for v in x.split("x")) for x in a.tensor_norm.split(",") if x],
                      [int(x) for x in a.tensor_norm_index.split(",") if x], a.tensor_norm_all)
    patch_magnitude_scale_votes([int(x) for x in a.magnitude_scale_index.split(",") if x], a.magnitude_scale_all)
    patch_frozen_scales([int(x) for x in a.frozen_scales_index.split(",") if x])
    print(f"hf_flip_levers: fa_init={a.fa_init} fa_scale={a.fa_scale} warmup_frac={a.warmup_frac} reset={a.reset} frozen_trits={a.frozen_trits!r} frozen_index={a.frozen_index!r} tensor_norm={a.tensor_norm!r}/{a.tensor_norm_index!r}/all={a.tensor_norm_all} "
          f"arbs train {' '.join(rest)}", file=sys.stderr, flush=True)
    from arbs_cli.main import main as arbs_main

    return arbs_main(["train", *rest], standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
