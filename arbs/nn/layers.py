"""Torch glue: E1TM Linear/Embedding modules whose only state is integer buffers.

Forward materializes the ephemeral float ``W_eff`` from ``T_packed``/``E``/``corr_accum``; backward
re-materializes it (forward keeps only the layer input), computes the weight gradient, hands it to the
update rule as integer votes and drops it. There is no ``.grad`` for E1TM weights and no optimizer.

A weight used several times in one step (the tied embedding/head) or over several micro-batches
(inside ``accumulate(model)``) votes once, on its summed gradient, when its last pending use has
finished backward (or at ``step(model)``). Usage: see :mod:`arbs.nn.ternarize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import formats, ops
from ..errors import ConfigError


@dataclass
class Clock:
    """The scheme and the one step_counter shared by every E1TM module of a model."""

    scheme: formats.Scheme
    step_counter: int = 0
    accumulating: bool = False
    seed: int = 0  # keys the flip rule's stochastic votes, with each tensor's index and step_counter
    fuse_phase: bool = False  # scales were fused into E (enter_fuse_phase_); votes leave E/corr_accum
    stats: dict = field(default_factory=lambda: {"carries": 0, "saturations": 0, "flips": 0})
    # GPU: every layer's vote adds its counts to this one int64 device tensor (no sync per layer);
    # step() reads it once (cuda.read_counts). [nonfinite, out_of_range, carries, saturations, flips]
    device_counts: torch.Tensor | None = field(default=None, repr=False)

    sched: torch.Tensor | None = field(default=None, repr=False)  # cuda.sched: [step_counter, vote gain]


class E1TMWeight(nn.Module):
    """Base of E1TM modules: integer buffers for one weight of logical ``shape``."""

    def __init__(self, shape, clock: Clock, state: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.clock = clock
        if state is None:
            state, _ = ops.convert(np.zeros(self.shape, np.float32), clock.scheme)
        ops.check_state(state, self.shape, clock.scheme)
        for name in clock.scheme.arrays():
            self.register_buffer(name, torch.from_numpy(np.array(state[name], copy=True)))
        # requires_grad anchor: makes autograd call our backward even when no input needs a gradient
        self._anchor = torch.empty(0, requires_grad=True)
        self.tensor_index = 0  # position among the model's E1TM tensors (keys the flip rule's draws)
        self._pending = 0
        self._grad_sum: torch.Tensor | None = None
        self._rows_cols = formats.tensor_view(self.shape)
        self._views = None  # state_arrays' cache: [(name, buffer, numpy view)]

    # -- state ---------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """numpy views of the integer buffers (CPU); writes through to the module."""
        bufs, views = self._buffers, self._views
        if views is None or any(bufs[n] is not t for n, t, _ in views):  # made once, again if a buffer is replaced
            views = [(n, bufs[n], bufs[n].numpy()) for n in self.clock.scheme.arrays()]
            ops.check_state({n: a for n, _, a in views}, self.shape, self.clock.scheme)  # what ops.*_unchecked rely on
            self._views = views
        return {n: a for n, _, a in views}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        ops.check_state(arrays, self.shape, self.clock.scheme)
        for name in self.clock.scheme.arrays():
            getattr(self, name).copy_(torch.from_numpy(np.asarray(arrays[name])))

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ephemeral W_eff (a fresh tensor each call) in ``dtype``; by default float32, or on a GPU inside
        an enabled autocast the autocast dtype. A GPU kernel writes it in that dtype directly; on the
        CPU the float32 result is cast."""
        if self.T_packed.is_cuda:
            from . import cuda

            return cuda.materialize(self, dtype)
        out = torch.empty(self._rows_cols, dtype=torch.float32)  # state_arrays checked the buffers it views
        ops.materialize_unchecked(self.state_arrays(), self.clock.scheme, self.clock.step_counter, out.numpy())
        out = out.view(self.shape)
        return out if dtype is None else out.to(dtype)

    # -- votes ---------------------------------------------------------------------------------
    def _use(self) -> None:
        if torch.is_grad_enabled():
            self._pending += 1

    def _receive_grad(self, grad_w: torch.Tensor) -> None:
        # a sum of several uses is kept in float32 even when each use's gradient is bf16
        self._grad_sum = grad_w if self._grad_sum is None else self._grad_sum.float() + grad_w
        self._pending -= 1
        if self._pending <= 0 and not self.clock.accumulating:
            self.flush()

    def flush(self) -> None:
        """Vote on the summed gradient now, if there is one."""
        grad, self._grad_sum, self._pending = self._grad_sum, None, 0
        if grad is None:
            return
        if self.T_packed.is_cuda:  # the bf16/float32 gradient goes to the kernels as is; counts read at step()
            from . import cuda

            cuda.vote_async(self, grad)
            return
        c = self.clock
        g2 = grad.detach().float().reshape(self._rows_cols).contiguous().numpy()
        st = ops.vote_unchecked(self.state_arrays(), g2, c.scheme, step_counter=c.step_counter, seed=c.seed,
                              tensor=self.tensor_index, scales=not c.fuse_phase)
        for k in self.clock.stats:
            self.clock.stats[k] += getattr(st, k)

    def extra_repr(self) -> str:
        s = self.clock.scheme
        return f"shape={self.shape}, format={s.format}, rule={s.rule}"


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, mod):
        ctx.mod = mod
        ctx.save_for_backward(x)
        w = mod.materialize()  # on a GPU inside autocast: already in the autocast dtype
        return F.linear(x, w if torch.is_autocast_enabled(x.device.type) else w.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        mod = ctx.mod
        w = mod.materialize(gy.dtype)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)
        mod._receive_grad(gw)  # only its signs matter: bf16 is voted as is, never copied to float32
        return gx, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, anchor, mod):
        ctx.mod = mod
        ctx.save_for_backward(idx)
        return F.embedding(idx, mod.materialize())

    @staticmethod
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        gw = torch.zeros(ctx.mod.shape, dtype=torch.float32, device=gy.device)
        gw.index_add_(0, idx.reshape(-1), gy.reshape(-1, gy.shape[-1]).float())
        ctx.mod._receive_grad(gw)
        return None, None, None


class E1TMLinear(E1TMWeight):
    """Bias-free Linear ``y = x @ W_eff.T`` with E1TM integer state; optional float ``bias`` (user-trained)."""

    def __init__(self, in_features: int, out_features: int, clock: Clock, state=None, bias: torch.Tensor | None = None):
        super().__init__((out_features, in_features), clock, state)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        self._use()
        y = _LinearFn.apply(x, self._anchor, self)
        return y if self.bias is None else y + self.bias


class E1TMEmbedding(E1TMWeight):
    """Embedding lookup with E1TM state; ``attend(x) = x @ W_eff.T`` is the tied output head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, clock: Clock, state=None):
        super().__init__((num_embeddings, embedding_dim), clock, state)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, idx):
        self._use()
        return _EmbeddingFn.apply(idx, self._anchor, self)

    def attend(self, x):
        self._use()
        return _LinearFn.apply(x, self._anchor, self)


def e1tm_modules(model: nn.Module) -> dict[str, E1TMWeight]:
    """name -> E1TM module, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, E1TMWeight)}


def model_clock(model: nn.Module) -> Clock:
    mods = e1tm_modules(model)
    if not mods:
        raise ConfigError("the model has no E1TM layers; call arbs.nn.ternarize_(model) first")
    clocks = {id(m.clock) for m in mods.values()}
    if len(clocks) != 1:
        raise ConfigError("the model's E1TM layers do not share one clock; ternarize the model in one call")
    return next(iter(mods.values())).clock
