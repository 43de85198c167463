"""Torch glue: E1TM Linear/Embedding/MultiheadAttention modules whose only state is integer buffers.

Forward materializes the ephemeral float ``W_eff`` from ``T_packed``/``E``/``corr_accum``; backward
re-materializes it (forward keeps only the layer input), computes the weight gradient, hands it to the
update rule as integer votes and drops it. There is no ``.grad`` for E1TM weights and no optimizer.

A weight used several times in one step (the tied embedding/head, a Parameter two modules shared before
``ternarize_``) or over several micro-batches (inside ``accumulate(model)``) votes once, on its summed
gradient, when its last pending use has finished backward (or at ``step(model)``). Usage: see
:mod:`arbs.nn.ternarize`.

torch's contracts that code around a layer relies on:

- ``layer.weight`` answers with ``W_eff`` (float32, the logical shape), materialized on every read: a new
  tensor, not a Parameter, outside autograd; writing into it changes nothing, and assigning to ``.weight``
  raises AttributeError. ``E1TMMultiheadAttention.in_proj_weight`` (and ``q/k/v_proj_weight``) likewise.
- ``torch.compile``: materialize and vote are the custom ops ``arbs::materialize`` and ``arbs::vote``
  (:mod:`.custom_ops`), so dynamo captures a layer's forward, and its backward through the autograd
  Functions below, without graph breaks (``tests/test_nn_contracts.py``). A compiled step gives the eager
  step's integers. One guard remains: the layer's count of pending uses is a Python int that the traced
  forward increments, so a forward run while another use of the same layer still waits for its backward
  (two forwards, then their backwards) compiles once more for each such count.
- eval mode with grad disabled: a layer materializes once and reuses ``W_eff`` until its state changes (a
  vote, ``load_arrays``, ``load_tensor_states``, the fuse phase, a step, an in-place torch write or a
  replaced buffer). Writes through the numpy views of ``state_arrays()`` are not seen: call
  ``layer.invalidate()`` after them. Never used in training mode, with grad enabled, or while traced.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import formats, ops
from ..errors import ConfigError, IntegerRangeError, NonFiniteError
from . import custom_ops


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
    # integer vote sums (micro_batches(model), data_parallel): each backward's votes are kept as integer counts
    # (E1TMWeight._counts) and step() applies their sum (all-reduced over the ranks by ``reducer``) once
    vote_sum: bool = False
    # ... and divides that sum by the step's slot count S with stochastic rounding (arbs.distributed.mean_votes):
    # the mean vote, which moves the state as far per step as one vote; False: the plain sum (S times as far)
    vote_mean: bool = True
    reducer: object | None = field(default=None, repr=False)  # arbs.distributed.Reducer, or None: one process


def _out_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype ``materialize(dtype)`` returns on ``device``: float32 unless given, or inside an enabled
    CUDA autocast on a GPU its dtype (as arbs.nn.cuda does)."""
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


class _ReadOnlyWeights:
    """Mixin for nn.Module classes whose ``_read_only`` attributes are W_eff properties: assigning raises."""

    _read_only: tuple[str, ...] = ("weight",)

    def __setattr__(self, name, value):
        if name in self._read_only:
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: it is W_eff, materialized from the integer E1TM "
                "state on every read (a new float32 tensor, not a Parameter). Change the state with "
                "load_arrays / arbs.nn.load_tensor_states, or train it (backward, then arbs.nn.step)"
            )
        super().__setattr__(name, value)


class _StateView:
    """A layer's clock, shape and tensor_index with other tensors as its state: what arbs.nn.cuda reads."""

    def __init__(self, layer: E1TMWeight, state):
        self.clock, self.shape, self.tensor_index = layer.clock, layer.shape, layer.tensor_index
        for name, t in zip(layer.clock.scheme.arrays(), state, strict=True):
            setattr(self, name, t)


class E1TMWeight(_ReadOnlyWeights, nn.Module):
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
        self._names = clock.scheme.arrays()
        self._pending = 0
        self._grad_sum: torch.Tensor | None = None
        self._counts: dict[str, np.ndarray] | None = None  # vote sums of this step's micro-batches (vote_sum)
        self._micro = 0  # micro-batches voted into _counts this step
        self._nonfinite = 0  # of them, those whose gradient held NaN/inf (no votes taken; step() raises)
        self._rows_cols = formats.tensor_view(self.shape)
        self._views = None  # state_arrays' cache: [(name, buffer, numpy view)]
        self._key = custom_ops.register(self)  # names this layer to the custom ops
        self._version = 0  # bumped whenever this module changes its state (invalidate)
        self._cache = None  # eval-mode W_eff: (key, state tensors, W_eff)

    # -- copies ----------------------------------------------------------------------------------
    def __getstate__(self):  # deepcopy, pickle: numpy views and the W_eff cache belong to these buffers
        state = super().__getstate__()
        state.update(_views=None, _cache=None, _key=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._key = custom_ops.register(self)

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """The integer buffers, in ``clock.scheme.arrays()`` order."""
        return tuple(getattr(self, n) for n in self._names)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """numpy views of the integer buffers (CPU); writes through to the module (call ``invalidate()``
        after writing through them)."""
        bufs, views = self._buffers, self._views
        if views is None or any(bufs[n] is not t for n, t, _ in views):  # made once, again if a buffer is replaced
            views = [(n, bufs[n], bufs[n].numpy()) for n in self.clock.scheme.arrays()]
            ops.check_state({n: a for n, _, a in views}, self.shape, self.clock.scheme)  # what ops.*_unchecked rely on
            self._views = views
        return {n: a for n, _, a in views}

    def _arrays(self, state) -> dict[str, np.ndarray]:
        """numpy views of ``state`` (tensors in scheme order; None: the buffers), checked."""
        if state is None or all(t is b for t, b in zip(state, self.state_tensors(), strict=True)):
            return self.state_arrays()
        arrays = {n: t.detach().numpy() for n, t in zip(self._names, state, strict=True)}
        ops.check_state(arrays, self.shape, self.clock.scheme)
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        ops.check_state(arrays, self.shape, self.clock.scheme)
        for name in self.clock.scheme.arrays():
            getattr(self, name).copy_(torch.from_numpy(np.asarray(arrays[name])))
        self.invalidate()

    def invalidate(self) -> None:
        """Say that the state changed: drops the eval-mode W_eff. Votes, load_arrays, load_tensor_states and
        the fuse phase call it; call it after writing the buffers through numpy (``state_arrays()``)."""
        self._version += 1
        self._cache = None

    def materialize(self, dtype: torch.dtype | None = None, state=None) -> torch.Tensor:
        """Ephemeral W_eff (a fresh tensor each call) in ``dtype``; by default float32, or on a GPU inside
        an enabled autocast the autocast dtype. A GPU kernel writes it in that dtype directly; on the
        CPU the float32 result is cast. ``state``: tensors to read instead of the buffers (scheme order)."""
        tp = self.T_packed if state is None else state[0]
        if tp.is_cuda:
            from . import cuda

            return cuda.materialize(self if state is None else _StateView(self, state), dtype)
        out = torch.empty(self._rows_cols, dtype=torch.float32)  # _arrays checked the buffers it views
        ops.materialize_unchecked(self._arrays(state), self.clock.scheme, self.clock.step_counter, out.numpy())
        out = out.view(self.shape)
        return out if dtype is None else out.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """W_eff as float32 in the logical shape: materialized on every read, a new tensor (not a Parameter,
        outside autograd); writing into it changes nothing, assigning to ``.weight`` raises AttributeError.
        To compute with W_eff inside autograd (its gradient voted on) use :meth:`w_eff`."""
        return _materialize(self, (), torch.float32)  # the custom op while traced

    def w_eff(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_eff to compute with, as the layer's own forward does: with grad enabled a tensor of the autograd
        graph whose gradient is voted on (one use); otherwise the frozen W_eff (in eval mode the cached one:
        do not write into it)."""
        if torch.is_grad_enabled():
            self._use()
            return _WeightFn.apply(self._anchor, self, dtype, *self._traced_state())
        return self._frozen(dtype)

    def _traced_state(self) -> tuple[torch.Tensor, ...]:
        # while dynamo traces, the state tensors enter the autograd Functions so the graph holds them
        return self.state_tensors() if torch.compiler.is_compiling() else ()

    def _frozen(self, dtype: torch.dtype | None) -> torch.Tensor:
        """W_eff outside autograd; in eval mode (not while traced) the one cached until the state changes."""
        if torch.compiler.is_compiling():
            return _materialize(self, self.state_tensors(), dtype)
        if self.training:
            self._cache = None
            return self.materialize(dtype)
        bufs, c = self._buffers, self.clock
        state = [bufs[n] for n in self._names]
        # the state version (votes, loads, fuse phase), the step, the dtype asked for (None: autocast's on a GPU),
        # and each buffer's identity and torch version counter (replaced buffers, in-place torch writes)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = [self._version, c.step_counter, c.fuse_phase, dtype, autocast, *[t._version for t in state]]
        cache = self._cache
        if cache is not None and cache[0] == key and all(map(operator.is_, cache[1], state)):
            return cache[2]
        w = self.materialize(dtype)
        self._cache = (key, state, w)
        return w

    # -- forward -------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_eff.T`` (bias-free)."""
        if torch.is_grad_enabled():
            self._use()
            return _LinearFn.apply(x, self._anchor, self, *self._traced_state())
        w = self._frozen(None)
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of W_eff."""
        if torch.is_grad_enabled():
            self._use()
            return _EmbeddingFn.apply(idx, self._anchor, self, *self._traced_state())
        return F.embedding(idx, self._frozen(None))

    # -- votes ---------------------------------------------------------------------------------
    def _use(self) -> None:
        self._pending += 1

    def receive_grad(self, grad_w: torch.Tensor, state=None, borrowed: bool = False) -> None:
        """One use's gradient of W_eff. Summed with the step's other uses (in float32 when there are several);
        at the last pending use, outside ``accumulate``, the layer votes on the sum. ``state``: the tensors to
        update instead of the buffers (a compiled graph's); ``borrowed``: ``grad_w`` may not be kept."""
        self._pending -= 1
        last = self._pending <= 0 and not self.clock.accumulating
        if self._grad_sum is None:
            self._grad_sum = grad_w.clone() if borrowed and not last else grad_w
        else:  # a sum of several uses is kept in float32 even when each use's gradient is bf16
            self._grad_sum = self._grad_sum.float() + grad_w
        if last:
            self.flush(state)

    def flush(self, state=None, *, count: bool | None = None) -> None:
        """Vote on the summed gradient now, if there is one (``state``: tensors to update instead of the buffers).

        ``count`` (default: the clock's ``vote_sum``, or a process group is active): keep the votes as integer
        counts of one micro-batch (:meth:`count_votes`) for ``arbs.nn.step`` to sum and apply, instead of
        applying them now."""
        grad, self._grad_sum, self._pending = self._grad_sum, None, 0
        if grad is None:
            return
        c = self.clock
        if count is None:
            from .. import distributed

            count = c.vote_sum or c.reducer is not None or distributed.is_active()
        tp = self.T_packed if state is None else state[0]
        if count:
            if tp.is_cuda or state is not None:
                raise ConfigError(
                    "integer vote sums (--micro-batches > 1, torch.distributed) run on the CPU only in this version; "
                    "on a GPU train one process with one micro-batch per step, or use --micro-batch-votes "
                    "accumulate (docs/distributed.md)")
            self.count_votes(grad)
            return
        self.invalidate()
        if tp.is_cuda:  # the bf16/float32 gradient goes to the kernels as is; counts read at step()
            from . import cuda

            cuda.vote_async(self if state is None else _StateView(self, state), grad)
            return
        c = self.clock
        g2 = grad.detach().float().reshape(self._rows_cols).contiguous().numpy()
        st = ops.vote_unchecked(self._arrays(state), g2, c.scheme, step_counter=c.step_counter, seed=c.seed,
                                tensor=self.tensor_index, scales=not c.fuse_phase)
        for k in self.clock.stats:
            self.clock.stats[k] += getattr(st, k)

    # -- integer vote sums (micro-batches, data parallel) ---------------------------------------------
    def count_votes(self, grad: torch.Tensor) -> None:
        """Add one micro-batch's integer votes on ``grad`` (the gradient of W_eff) to this step's counts,
        changing no state: ``delta`` (int64 (rows, ng), the group votes -sum sign(g)*T, when the scales are
        voted) and ``trits`` (int32 (rows, cols_p), flip's counter steps, when the trits vote). The draws of
        flip's stochastic votes are keyed by the micro-batch's global slot (``slot_seed``): slot 0 draws what a
        plain vote draws. A NaN/inf gradient adds no votes and is counted; ``step`` then raises."""
        from .. import distributed

        c = self.clock
        red = c.reducer
        slot = distributed.slot_of(self._micro, red.rank, red.world) if red is not None else self._micro
        self._micro += 1
        plan = vote_plan(c)
        arrays = self.state_arrays()
        g2 = grad.detach().float().reshape(self._rows_cols).contiguous().numpy()
        rows, ng = arrays["E"].shape
        if self._counts is None:
            self._counts = {}
            if plan.scales:
                self._counts["delta"] = np.zeros((rows, ng), np.int64)
            if plan.trits:
                self._counts["trits"] = np.zeros(arrays["flip_accum"].shape, np.int32)
        seed = distributed.slot_seed(c.seed, slot)

        def scratch(tp):  # zero state: after one vote, corr_accum holds delta and flip_accum the trit votes
            st = {"T_packed": tp, "E": np.zeros((rows, ng), np.int8), "corr_accum": np.zeros((rows, ng), np.int64)}
            if plan.trits:
                st["flip_accum"] = np.zeros(arrays["flip_accum"].shape, np.int8)
            return st

        def vote(st, scales):
            ops.vote_unchecked(st, g2, plan.scheme, step_counter=c.step_counter, seed=seed,
                               tensor=self.tensor_index, scales=scales)

        st = scratch(arrays["T_packed"].copy())  # a copy: the scratch scheme may move a trit at +-127
        try:
            vote(st, plan.scales)
        except NonFiniteError:
            self._nonfinite += 1
            return
        if plan.scales:
            self._counts["delta"] += st["corr_accum"]
        if plan.trits:
            votes = st["flip_accum"]
            if plan.full_range:  # vote_max 127: a +-127 vote may have moved a scratch trit; vote again on all-(+1)
                # and all-(-1) trits, where +127 (resp. -127) cannot move one: take whichever kept its vote
                cols_p = votes.shape[1]
                ones = np.ones((rows, cols_p), np.int8)
                up = scratch(ops.pack(ones, 1)[:, :arrays["T_packed"].shape[1]].copy())
                down = scratch(ops.pack(-ones, 1)[:, :arrays["T_packed"].shape[1]].copy())
                vote(up, False)
                vote(down, False)
                votes = np.where(up["flip_accum"] != 0, up["flip_accum"], down["flip_accum"])
            self._counts["trits"] += votes

    def take_counts(self, plan: VotePlan) -> tuple[np.ndarray | None, np.ndarray | None]:
        """This step's summed (delta, trits) per ``plan`` (zeros where no micro-batch voted), and forget them."""
        counts, self._counts, self._micro = self._counts or {}, None, 0
        rows, ng = self._buffers["E"].shape
        delta = trits = None
        if plan.scales:
            delta = counts.get("delta")
            delta = np.zeros((rows, ng), np.int64) if delta is None else delta
        if plan.trits:
            trits = counts.get("trits")
            trits = np.zeros(tuple(self._buffers["flip_accum"].shape), np.int32) if trits is None else trits
        return delta, trits

    def apply_counts(self, delta: np.ndarray | None, trits: np.ndarray | None) -> None:
        """Apply summed votes once, in place: ``corr_accum += delta`` with the rule's carry into E (the same
        kernel a plain vote uses), then flip's counters ``c = clamp(c + trits, -theta, theta)``, a trit moving at
        +-theta (c = -reset, resp. +reset, then): the kernels ``apply_votes`` and ``apply_trit_counts``. Counts
        go to ``clock.stats``."""
        from ..kernels import cpu

        c = self.clock
        s = c.scheme
        arrays = self.state_arrays()
        self.invalidate()
        carries = sats = flips = 0
        if delta is not None:
            corr = arrays["corr_accum"]
            limit = s.carry_limit
            if limit == 0 and corr.size:  # average: corr_accum only grows; never let it wrap
                room = formats.INT64_MAX - max(int(np.abs(delta).max()), 0)
                if max(int(corr.max()), -int(corr.min())) > room:
                    raise IntegerRangeError("corr_accum would leave int64 with this step's vote sum; refusing to vote")
            delta = np.ascontiguousarray(delta, np.int64)
            carries, sats = cpu.kernel("apply_votes", corr.size * 16)(corr, arrays["E"], delta, limit)
        if trits is not None:
            counts = np.ascontiguousarray(trits[:, :self._rows_cols[1]], np.int64)
            flips = cpu.kernel("apply_trit_counts", counts.size)(
                arrays["T_packed"], arrays["flip_accum"], counts, s.params["theta"], s.params["reset"])
        for k, n in (("carries", carries), ("saturations", sats), ("flips", flips)):
            c.stats[k] += int(n)

    def extra_repr(self) -> str:
        s = self.clock.scheme
        return f"shape={self.shape}, format={s.format}, rule={s.rule}"


@dataclass(frozen=True)
class VotePlan:
    """What one step's integer votes hold, the same on every rank: ``scales`` (group votes into corr_accum; not in
    the fuse phase), ``trits`` (flip's counter steps; not past the vote horizon), ``trit_max`` (largest |step| of
    one vote), and the ``scheme`` that computes one micro-batch's votes on a zero scratch state (never carries, and
    moves no trit unless ``full_range``: vote_max = 127 = the largest theta)."""

    scales: bool
    trits: bool
    trit_max: int
    full_range: bool
    scheme: formats.Scheme


def vote_plan(clock: Clock) -> VotePlan:
    from .. import schedule

    s = clock.scheme
    p = s.params
    trits = "flip_accum" in s.arrays() and (p["gain"] == 0 or schedule.trit_vote_gain(p, clock.step_counter) > 0)
    trit_max = (p["vote_max"] if p["gain"] > 0 else 1) if trits else 0
    if "flip_accum" in s.arrays():
        hi = {n: formats.PARAMS[n].hi for n in ("K", "theta")}
        scratch = formats.make_scheme(s.format, "flip", K=hi["K"], theta=hi["theta"], gain=p["gain"],
                                      horizon=p["horizon"], vote_max=p["vote_max"], vote_norm=p["vote_norm"],
                                      reset=0)
    else:  # average: corr_accum += delta, no carry
        scratch = formats.make_scheme(s.format, "average")
    return VotePlan(scales=not clock.fuse_phase, trits=trits, trit_max=trit_max,
                    full_range=trits and trit_max >= formats.PARAMS["theta"].hi, scheme=scratch)


# -- the autograd Functions: the custom ops while dynamo traces, the layer's methods otherwise ---------------
def _materialize(mod: E1TMWeight, state, dtype: torch.dtype | None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        state = list(state) or list(mod.state_tensors())
        return torch.ops.arbs.materialize(state, mod._key, list(mod.shape), _out_dtype(dtype, state[0].device))
    return mod.materialize(dtype)


def _vote(mod: E1TMWeight, grad: torch.Tensor, state) -> None:
    if torch.compiler.is_compiling():
        torch.ops.arbs.vote(grad, list(state) or list(mod.state_tensors()), mod._key)
    else:
        mod.receive_grad(grad)


class _LinearFn(torch.autograd.Function):
    # inputs: x, anchor, the layer, then (only while traced) its state tensors
    @staticmethod
    def forward(ctx, x, anchor, mod, *state):
        ctx.mod = mod
        ctx.save_for_backward(x, *state)
        w = _materialize(mod, state, None)  # on a GPU inside autocast: already in the autocast dtype
        return F.linear(x, w if torch.is_autocast_enabled(x.device.type) else w.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, *state = ctx.saved_tensors
        mod = ctx.mod
        w = _materialize(mod, state, gy.dtype)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)
        _vote(mod, gw, state)  # only its signs matter: bf16 is voted as is, never copied to float32
        return (gx,) + (None,) * (len(ctx.needs_input_grad) - 1)


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, anchor, mod, *state):
        ctx.mod = mod
        ctx.save_for_backward(idx, *state)
        return F.embedding(idx, _materialize(mod, state, None))

    @staticmethod
    def backward(ctx, gy):
        idx, *state = ctx.saved_tensors
        gw = torch.zeros(ctx.mod.shape, dtype=torch.float32, device=gy.device)
        gw.index_add_(0, idx.reshape(-1), gy.reshape(-1, gy.shape[-1]).float())
        _vote(ctx.mod, gw, state)
        return (None,) * len(ctx.needs_input_grad)


class _WeightFn(torch.autograd.Function):
    """W_eff as a tensor of the autograd graph (for code that takes weights, e.g. F.multi_head_attention_forward):
    its gradient is voted on as a layer forward's is."""

    @staticmethod
    def forward(ctx, anchor, mod, dtype, *state):
        ctx.mod = mod
        ctx.save_for_backward(*state)
        return _materialize(mod, state, dtype)

    @staticmethod
    def backward(ctx, gw):
        _vote(ctx.mod, gw, ctx.saved_tensors)
        return (None,) * len(ctx.needs_input_grad)


# -- modules -------------------------------------------------------------------------------------------------
def _own_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """The float bias as a Parameter: the user's own Parameter object when it is one (their optimizer keeps it)."""
    if bias is None or isinstance(bias, nn.Parameter):
        return bias
    return nn.Parameter(bias.detach().clone())


class E1TMLinear(E1TMWeight):
    """Bias-free Linear ``y = x @ W_eff.T`` with E1TM integer state; optional float ``bias`` (user-trained)."""

    def __init__(self, in_features: int, out_features: int, clock: Clock, state=None, bias: torch.Tensor | None = None):
        super().__init__((out_features, in_features), clock, state)
        self.in_features, self.out_features = in_features, out_features
        self.bias = _own_bias(bias)

    def forward(self, x):
        y = self.linear(x)
        return y if self.bias is None else y + self.bias


class E1TMEmbedding(E1TMWeight):
    """Embedding lookup with E1TM state; ``attend(x) = x @ W_eff.T`` is the tied output head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, clock: Clock, state=None):
        super().__init__((num_embeddings, embedding_dim), clock, state)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, idx):
        return self.embed(idx)

    def attend(self, x):
        return self.linear(x)


class _Tied(_ReadOnlyWeights, nn.Module):
    """A module whose weight is another module's E1TM state (``source``); it owns none."""

    def __init__(self, source: E1TMWeight):
        super().__init__()
        # not a submodule: the state is listed, indexed, moved and saved once, where the source lives
        object.__setattr__(self, "source", source)

    @property
    def weight(self) -> torch.Tensor:
        """The source's W_eff (read-only, see E1TMWeight.weight)."""
        return self.source.weight

    def w_eff(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.source.w_eff(dtype)

    def extra_repr(self) -> str:
        return f"shape={self.source.shape}, tied to an E1TM weight"


class E1TMTiedLinear(_Tied):
    """A Linear whose float weight was a Parameter shared with an earlier converted module (tied weights, e.g.
    ``lm_head.weight is embed_tokens.weight``): it computes with that module's E1TM state, so the weight is
    stored, indexed and saved once and votes once per step, on the sum of every use's gradient. Its float
    ``bias`` (if any) is its own Parameter."""

    def __init__(self, source: E1TMWeight, bias: torch.Tensor | None = None):
        super().__init__(source)
        self.out_features, self.in_features = source.shape
        self.bias = _own_bias(bias)

    def forward(self, x):
        y = self.source.linear(x)
        return y if self.bias is None else y + self.bias


class E1TMTiedEmbedding(_Tied):
    """An Embedding whose float weight was a Parameter shared with an earlier converted module (see E1TMTiedLinear)."""

    def __init__(self, source: E1TMWeight):
        super().__init__(source)
        self.num_embeddings, self.embedding_dim = source.shape

    def forward(self, idx):
        return self.source.embed(idx)

    def attend(self, x):
        return self.source.linear(x)


class E1TMMultiheadAttention(_ReadOnlyWeights, nn.MultiheadAttention):
    """nn.MultiheadAttention whose projection weights are E1TM state: ``in_proj`` (the packed 3E x E q/k/v
    weight; ``q_proj``/``k_proj``/``v_proj`` when kdim or vdim differ from embed_dim) and ``out_proj``
    (an E1TMLinear). The float biases (``in_proj_bias``, ``out_proj.bias``, ``bias_k``/``bias_v``) stay the
    user's float Parameters, trained by their own optimizer, as a Linear's bias does.

    ``forward`` is nn.MultiheadAttention's (batch_first, masks, need_weights, is_causal): it calls
    ``F.multi_head_attention_forward`` with W_eff tensors of the autograd graph, so backward votes. It does
    not take torch's fused inference path; ``nn.TransformerEncoderLayer``'s own fast path (eval, no grad)
    still works, reading the read-only ``in_proj_weight`` / ``out_proj.weight`` (W_eff).
    """

    _read_only = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, src: nn.MultiheadAttention, projections: dict[str, nn.Module]):
        nn.Module.__init__(self)
        for k in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                  "head_dim", "add_zero_attn"):
            setattr(self, k, getattr(src, k))
        self.register_parameter("in_proj_bias", src.in_proj_bias)
        self.bias_k, self.bias_v = src.bias_k, src.bias_v
        for name in ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj"):  # the order of the E1TM tensors
            setattr(self, name, projections.get(name))

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        return None if self.in_proj is None else self.in_proj.weight

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self.q_proj is None else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self.k_proj is None else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self.v_proj is None else self.v_proj.weight

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:  # as nn.MultiheadAttention: keep the "is" relations
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = {}
        if self.in_proj is None:
            separate = {"use_separate_proj_weight": True, "q_proj_weight": self.q_proj.w_eff(),
                        "k_proj_weight": self.k_proj.w_eff(), "v_proj_weight": self.v_proj.w_eff()}
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            None if self.in_proj is None else self.in_proj.w_eff(), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.w_eff(), self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, **separate,
        )
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights


def e1tm_modules(model: nn.Module) -> dict[str, E1TMWeight]:
    """name -> E1TM module, in model order (one entry per state: tied modules are not listed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, E1TMWeight)}


def model_clock(model: nn.Module) -> Clock:
    """The Clock shared by the model's E1TM layers (scheme, step_counter, seed, stats)."""
    mods = e1tm_modules(model)
    if not mods:
        raise ConfigError("the model has no E1TM layers; call arbs.nn.ternarize_(model) first")
    clocks = {id(m.clock) for m in mods.values()}
    if len(clocks) != 1:
        raise ConfigError("the model's E1TM layers do not share one clock; ternarize the model in one call")
    return next(iter(mods.values())).clock
