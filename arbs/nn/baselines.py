"""Float-latent ternary baselines: straight-through quantizers that arbs compares E1TM against.

Every baseline keeps a float latent weight ``W`` (an ordinary Parameter, trained by the caller's AdamW) and
uses ``W_q = quantizer(W)`` in the forward pass. All ternary baselines build ``W_q = s * T`` with trits
``T`` in {-1, 0, +1}; they differ in the scale ``s``, the trit rule and the gradient ``W`` receives:

* trit rule "round":     ``T = clamp(round(W / a), -1, 1)``  (T != 0 iff |W| > a/2; round half to even)
* trit rule "threshold": ``T = sign(W) * [|W| > threshold_abs]``, ``threshold_abs = threshold * mean|W|``

``a`` and ``threshold_abs`` are recomputed from the detached ``W`` at every forward; ``threshold`` is a multiple of
the tensor's current mean|W| (default 0.5). ``BASELINES`` is the one table of baselines; ``ste`` is the one
straight-through helper every gradient path is built from.

Usage::

    quantize_(model, "absmean")                       # nn.Linear / nn.Embedding -> QLinear / QEmbedding
    opt = torch.optim.AdamW([{"params": latent_parameters(model), "weight_decay": wd},
                             {"params": quantizer_parameters(model), "weight_decay": 0.0}], lr=lr)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import formats
from ..errors import ConfigError

log = logging.getLogger(__name__)

LSQ_QP = 1  # ternary: Qn = Qp = 1 in the LSQ paper's notation
TRIT_BITS = 8 / formats.TRITS_PER_BYTE  # base-3 packed trits, 5 per byte: the same 1.6 bits E1TM's bpw counts
SCALE_BITS = 16  # row / group scales and factorized magnitudes are stored as bf16


def ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass; in the backward pass ``x`` gets the upstream gradient unchanged.

    ``value`` keeps its own autograd graph, so learned parameters inside it (a scale ``S``) also get their
    true gradient. Built as ``value + (x - x.detach())``: the added term is exactly 0 for finite ``x``.
    """
    return value + (x - x.detach())


# -- detached scales (w2 is the weight viewed as (rows, cols), detached) --------------------------------


def _absmean(w2: torch.Tensor, gs: int, threshold: float) -> torch.Tensor:
    return w2.abs().mean()  # ()


def _absmean_row(w2: torch.Tensor, gs: int, threshold: float) -> torch.Tensor:
    return w2.abs().mean(dim=1, keepdim=True)  # (rows, 1)


def _absmax_group(w2: torch.Tensor, gs: int, threshold: float) -> torch.Tensor:
    rows, cols = w2.shape
    ng = formats.n_groups(cols, gs)
    a = F.pad(w2.abs(), (0, formats.padded_cols(cols, gs) - cols))  # (rows, cols_p); padding is 0: never the max
    a = a.view(rows, ng, gs).amax(dim=2)  # (rows, ng)
    return a.repeat_interleave(gs, dim=1)[:, :cols]  # (rows, cols)


def _threshold_abs(w2: torch.Tensor, gs: int, threshold: float) -> torch.Tensor:
    return threshold * w2.abs().mean()  # () threshold_abs


def _lsq_alpha0(w2: torch.Tensor, threshold: float) -> torch.Tensor:
    return 2 * w2.abs().mean() / math.sqrt(LSQ_QP)  # the LSQ paper's step init


def _support_mean(w2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Least-squares S for the initial trits: mean|W| over |W| > threshold_abs (mean|W| if that set is empty)."""
    a = w2.abs()
    on = (a > _threshold_abs(w2, 0, threshold)).to(a.dtype)
    n = on.sum()
    return torch.where(n > 0, (a * on).sum() / n.clamp_min(1), a.mean())


# -- the table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineSpec:
    """One float-latent baseline.

    Attributes
    ----------
    summary : one line for help texts.
    trits : "round", "threshold" or None (no trits: fp32).
    grad : what the latent W receives: "exact" (plain float), "ste" (upstream gradient unchanged),
        "mask" (upstream gradient where T != 0, exactly 0 elsewhere), "lsq" (upstream gradient inside the
        clip range |W/alpha| <= 1, 0 outside).
    scale : detached scale ``a`` (round) or ``threshold_abs`` (threshold) from (w2, gs, threshold); None when the
        scale is the learned ``alpha``.
    param : name of the quantizer's own learned Parameter (trained with W), or None.
    param_init : (w2, threshold) -> initial value of ``param``.
    uses_gs, uses_threshold : whether the ``gs`` / ``threshold`` options change this baseline.
    bpw : (cols, gs) -> honest inference bits per weight; per-tensor scalars are not counted.
    """

    summary: str
    trits: str | None
    grad: str
    scale: Callable[[torch.Tensor, int, float], torch.Tensor] | None
    param: str | None
    param_init: Callable[[torch.Tensor, float], torch.Tensor] | None
    uses_gs: bool
    uses_threshold: bool
    bpw: Callable[[int, int], float]


BASELINES: dict[str, BaselineSpec] = {
    "fp32": BaselineSpec(
        "plain float weights, W_q = W", None, "exact", None, None, None, False, False,
        lambda cols, gs: 32.0,
    ),
    "learned-s": BaselineSpec(
        "T = sign(W)*[|W| > threshold*mean|W|], W_q = S*T with one learned S per tensor; STE to W",
        "threshold", "ste", _threshold_abs, "S", _support_mean, False, True,
        lambda cols, gs: TRIT_BITS,
    ),
    "absmean": BaselineSpec(
        "BitNet b1.58: a = mean|W| per tensor, W_q = a*clamp(round(W/a), -1, 1); STE to W",
        "round", "ste", _absmean, None, None, False, False,
        lambda cols, gs: TRIT_BITS,
    ),
    "absmean-row": BaselineSpec(
        "absmean with one a = mean|W| per output row (dim 0); STE to W",
        "round", "ste", _absmean_row, None, None, False, False,
        lambda cols, gs: TRIT_BITS + SCALE_BITS / cols,
    ),
    "lsq": BaselineSpec(
        "LSQ: learned step alpha per tensor, W_q = alpha*clamp(round(W/alpha), -1, 1); LSQ gradients",
        "round", "lsq", None, "alpha", _lsq_alpha0, False, False,
        lambda cols, gs: TRIT_BITS,
    ),
    "factorized": BaselineSpec(
        "W_eff = W*[|W| > threshold*mean|W|]; weights in the deadzone get zero gradient (deadzone trapping)",
        "threshold", "mask", _threshold_abs, None, None, False, True,
        lambda cols, gs: float(SCALE_BITS),  # W_eff in bf16: its sign bit and zeros already hold T
    ),
    "absmax-group": BaselineSpec(
        "a_g = max|W| over gs consecutive weights of a row, W_q = a_g*clamp(round(W/a_g), -1, 1); STE to W",
        "round", "ste", _absmax_group, None, None, True, False,
        lambda cols, gs: TRIT_BITS + SCALE_BITS / gs,
    ),
}


def baseline_spec(baseline: str) -> BaselineSpec:
    """The BaselineSpec of ``baseline``; ConfigError with the valid names and a suggestion otherwise."""
    return formats.lookup(BASELINES, baseline, "baseline")


def _check_options(gs, threshold) -> None:
    if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs < 1:
        raise ConfigError(f"baseline option gs must be an integer >= 1, got {gs!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"baseline option threshold (a multiple of mean|W|) must be a finite number >= 0, got {threshold!r}")


# -- modules -----------------------------------------------------------------------------------------------


class Quantizer(nn.Module):
    """``forward(W) -> W_q`` for one baseline: differentiable in W and in this module's own Parameter.

    Holds ``S`` (learned-s) or ``alpha`` (lsq) as a 0-d Parameter initialised from the weight it was made
    for; other baselines hold no state. Build with :func:`make_quantizer`.
    """

    def __init__(self, baseline: str, weight: torch.Tensor, *, gs: int = 32, threshold: float = 0.5):
        super().__init__()
        spec = baseline_spec(baseline)
        _check_options(gs, threshold)
        self.baseline, self.gs, self.threshold = baseline, int(gs), float(threshold)
        if spec.param is not None:
            with torch.no_grad():
                init = spec.param_init(_rows(weight.detach()), self.threshold)
            self.register_parameter(spec.param, nn.Parameter(init.clamp_min(_tiny(init))))

    def extra_repr(self) -> str:
        spec = BASELINES[self.baseline]
        opts = [f"{self.baseline!r}"] + [f"gs={self.gs}"] * spec.uses_gs + [f"threshold={self.threshold}"] * spec.uses_threshold
        return ", ".join(opts)

    def scale(self, w2: torch.Tensor) -> torch.Tensor:
        """Detached ``a`` (round) or ``threshold_abs`` (threshold) for ``w2`` (rows, cols), broadcastable to it."""
        spec = BASELINES[self.baseline]
        a = getattr(self, spec.param).detach() if spec.scale is None else spec.scale(w2.detach(), self.gs, self.threshold)
        return a.clamp_min(_tiny(a))  # an all-zero tensor or group gives T = 0, not NaN

    def trits(self, w2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """T in {-1, 0, +1} (w2's dtype) by the baseline's trit rule, given its scale ``a``."""
        w2 = w2.detach()
        if BASELINES[self.baseline].trits == "round":
            return torch.clamp(torch.round(w2 / a), -1, 1)
        return torch.sign(w2) * (w2.abs() > a)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        spec = BASELINES[self.baseline]
        if spec.grad == "exact":
            return w
        w2 = _rows(w)  # (rows, cols)
        if spec.grad == "lsq":
            alpha = ste(self.alpha * (1 / math.sqrt(w.numel() * LSQ_QP)), self.alpha.detach())  # grad * g
            x = torch.clamp(w2 / alpha, -1, 1)  # clamp passes the gradient only inside the clip range
            wq = ste(x, torch.round(x.detach())) * alpha
        else:
            a = self.scale(w2)
            t = self.trits(w2, a)
            if spec.grad == "mask":
                wq = w2 * (t != 0)
            else:
                wq = ste(w2, (a if spec.param is None else getattr(self, spec.param)) * t)
        return wq.reshape(w.shape)


def make_quantizer(baseline: str, weight: torch.Tensor, *, gs: int = 32, threshold: float = 0.5) -> Quantizer:
    """The quantizer module of ``baseline`` for ``weight``.

    Parameters
    ----------
    baseline : a key of ``BASELINES``; ConfigError with a suggestion otherwise.
    weight : float tensor of any shape with at least one dimension, viewed as (rows = d0, cols = the rest);
        read only, to initialise ``S`` / ``alpha``.
    gs : group size of absmax-group (weights along a row that share one scale; rows are zero padded).
    threshold : threshold of learned-s / factorized as a multiple of the tensor's current mean|W|.

    Returns
    -------
    Quantizer whose ``forward(W)`` gives ``W_q`` of W's shape and dtype.
    """
    return Quantizer(baseline, weight, gs=gs, threshold=threshold)


class QLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``formats.linear(x, quantizer(weight), bias)``; a bias stays float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, baseline: str,
                 gs: int = 32, threshold: float = 0.5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.quantizer = make_quantizer(baseline, self.weight, gs=gs, threshold=threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantizer(self.weight), self.bias)


class QEmbedding(nn.Embedding):
    """``nn.Embedding`` looking rows up in ``quantizer(weight)``; ``attend(x) = x @ W_q.T`` is the tied head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, baseline: str,
                 gs: int = 32, threshold: float = 0.5, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.quantizer = make_quantizer(baseline, self.weight, gs=gs, threshold=threshold)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.quantizer(self.weight), self.padding_idx, None, 2.0, self.scale_grad_by_freq)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantizer(self.weight))  # (..., C) -> (..., V)


def quantize_(
    model: nn.Module,
    baseline: str,
    *,
    gs: int = 32,
    threshold: float = 0.5,
    include: Callable[[str, nn.Module], bool] = lambda name, module: True,
) -> nn.Module:
    """Replace the nn.Linear and nn.Embedding layers of ``model`` by QLinear / QEmbedding, in place.

    The new modules take over the original weight and bias Parameters themselves (same objects: tying,
    device, dtype and requires_grad are kept); the quantizer's ``S`` / ``alpha`` is initialised from the
    weight. Embeddings gain ``attend`` (tied head). For "fp32" the model is left as it is.

    Parameters
    ----------
    model : the module to change in place; it must not itself be a Linear/Embedding to replace.
    baseline, gs, threshold : see :func:`make_quantizer`.
    include : callable(name, module) -> bool selecting the layers to quantize.

    Returns
    -------
    ``model``.
    """
    spec = baseline_spec(baseline)
    _check_options(gs, threshold)
    done = [n for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))]
    if done:
        raise ConfigError(f"model is already quantized (layer {done[0]!r}); build a fresh float model to requantize")
    if spec.grad == "exact":
        return model
    targets = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and include(name, m)
    ]
    for name, m in targets:
        if not name:
            raise ConfigError(f"quantize_ replaces submodules; wrap the {type(m).__name__} in a container module")
        opts = dict(baseline=baseline, gs=gs, threshold=threshold, device="meta")  # meta: no throwaway allocation
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.sparse:
                raise ConfigError(f"embedding {name!r}: max_norm and sparse gradients are not supported by {baseline!r}")
            new = QEmbedding(m.num_embeddings, m.embedding_dim, m.padding_idx, **opts)
            new.scale_grad_by_freq = m.scale_grad_by_freq
        else:
            new = QLinear(m.in_features, m.out_features, m.bias is not None, **opts)
            new.bias = m.bias
        new.weight = m.weight
        new.quantizer = make_quantizer(baseline, m.weight, gs=gs, threshold=threshold)
        new.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    log.debug("quantize_: %d layers -> %s", len(targets), baseline)
    return model


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The quantizers' own Parameters (``S``, ``alpha``): train them with AdamW but without weight decay."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]


def latent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable Parameter of ``model`` that is not a quantizer's own (latent weights, biases)."""
    own = {id(p) for p in quantizer_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in own]


# -- diagnostics ------------------------------------------------------------------------------------------


def deadzone_stats(
    baseline: str,
    weight: torch.Tensor | np.ndarray,
    quantizer_state: dict | None = None,
    *,
    band: float = 0.05,
    gs: int = 32,
    threshold: float = 0.5,
) -> dict:
    """Trit fractions of ``weight`` under ``baseline`` and the fraction of weights near a trit boundary.

    Near means ``||W| - b| < band * a``: for the round rule ``b = a/2`` (|W/a| within ``band`` of 0.5, a the
    scale or alpha), for the threshold rule ``b = a = threshold_abs``.

    Parameters
    ----------
    baseline : a ternary baseline (not "fp32").
    weight : float tensor or array of any shape with at least one dimension and one element.
    quantizer_state : ``quantizer.state_dict()`` (keys "S" / "alpha"); None: the values the quantizer would
        be initialised with (for lsq, alpha = 2*mean|W|).
    band : non-negative width, relative to the scale.
    gs, threshold : as in :func:`make_quantizer`.

    Returns
    -------
    dict with float "frac_neg", "frac_zero", "frac_pos", "frac_near_boundary" and "band".
    """
    spec = baseline_spec(baseline)
    if spec.trits is None:
        raise ConfigError(f"baseline {baseline!r} has no trits; deadzone_stats applies to ternary baselines only")
    if not (isinstance(band, (int, float)) and math.isfinite(band) and band >= 0):
        raise ConfigError(f"band must be a finite number >= 0, got {band!r}")
    w = torch.as_tensor(weight).detach()
    if not w.is_floating_point() or w.numel() == 0:
        raise ConfigError(f"deadzone_stats needs a non-empty float weight, got dtype {w.dtype} shape {tuple(w.shape)}")
    q = make_quantizer(baseline, w, gs=gs, threshold=threshold)
    own = dict(q.named_parameters())
    with torch.no_grad():
        for k, v in (quantizer_state or {}).items():
            if k not in own:
                raise ConfigError(f"quantizer_state key {k!r} is not a parameter of {baseline!r} (has: {list(own)})")
            own[k].copy_(torch.as_tensor(v).reshape(()))
        w2 = _rows(w)
        a = q.scale(w2)
        t = q.trits(w2, a)
        b = a / 2 if spec.trits == "round" else a
        near = ((w2.abs() - b).abs() < band * a).double().mean().item()
    n = t.numel()
    return {
        "frac_neg": (t < 0).sum().item() / n,
        "frac_zero": (t == 0).sum().item() / n,
        "frac_pos": (t > 0).sum().item() / n,
        "frac_near_boundary": near,
        "band": float(band),
    }


def inference_bpw(baseline: str, *, cols: int, gs: int = 32) -> float:
    """Honest inference bits per weight of ``baseline`` for a weight with ``cols`` columns.

    Trits count 8/5 bits (base-3 packed, as E1TM's ``formats.theoretical_bpw``); row and group scales and
    factorized's W_eff are bf16; fp32 is as trained. Per-tensor scalars (S, alpha, a) and row padding are
    not counted.
    """
    spec = baseline_spec(baseline)
    _check_options(gs, 0.0)
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
        raise ConfigError(f"cols must be an integer >= 1, got {cols!r}")
    return float(spec.bpw(int(cols), int(gs)))


def _rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` viewed as (rows, cols) by the format's rule (rows = d0, cols = the rest; 1-D is one row)."""
    return w.reshape(formats.tensor_view(w.shape))


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny
