"""Torch glue: E1TM Linear/Embedding modules whose only state is integer buffers.

Forward materializes the ephemeral float ``W_eff`` from ``T_packed``/``E``/``corr_accum``; backward
re-materializes it (forward keeps only the layer input), computes the weight gradient, hands it to the
update rule as integer votes and drops it. There is no ``.grad`` for E1TM weights and no optimizer.

A weight used several times in one step (the tied embedding/head) or over several micro-batches
(inside ``accumulate(model)``) votes once, on its summed gradient, when its last pending use has
finished backward (or at ``step(model)``).

Usage::

    clock = arbs.nn.ternarize_(model, format="E1TM32", rule="flip")
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()          # votes happen here, layer by layer
        arbs.nn.step(model)      # flushes pending votes, step_counter += 1
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_

from . import formats as F
from . import ops
from .errors import ConfigError


@dataclass
class Clock:
    """The scheme and the one step_counter shared by every E1TM module of a model."""

    scheme: F.Scheme
    step_counter: int = 0
    accumulating: bool = False
    seed: int = 0  # keys the flip rule's stochastic votes, with each tensor's index and step_counter
    freeze_scale: bool = False  # fuse phase: scales were fused into E (fuse_scales_); votes leave E/corr_accum
    stats: dict = field(default_factory=lambda: {"carries": 0, "saturations": 0, "flips": 0})
    # GPU: every layer's vote adds its counts to this one int64 device tensor (no sync per layer);
    # step() reads it once. [nonfinite, out_of_range, carries, saturations, flips]
    device_counts: torch.Tensor | None = field(default=None, repr=False)

    _sched: torch.Tensor | None = field(default=None, repr=False)

    def device_sched(self, device) -> torch.Tensor:
        """float64 device tensor [step_counter, flip vote gain at that step] read by the GPU flip votes.
        Written from the host here, except while a CUDA graph is being captured (the graph then reads
        what :func:`step` writes after every replay)."""
        if self._sched is None or self._sched.device != torch.device(device):
            self._sched = torch.zeros(2, dtype=torch.float64, device=device)
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self.write_sched()
        return self._sched

    def write_sched(self) -> None:
        if self._sched is not None:
            gain_m = F.trit_vote_gain(self.scheme.params, self.step_counter)
            self._sched.copy_(torch.tensor([float(self.step_counter), gain_m], dtype=torch.float64))

    def read_device_counts(self) -> None:
        """Fold the GPU votes' counts into ``stats`` and zero them (one sync); raise if a vote was
        refused (triton_gpu.read_counts: from that layer on, no vote of the step changed any state)."""
        if self.device_counts is None:
            return
        from .kernels import triton_gpu

        try:
            st = triton_gpu.read_counts(self.device_counts)
        finally:
            self.device_counts.zero_()
        for k in self.stats:
            self.stats[k] += getattr(st, k)


class _E1TMWeight(nn.Module):
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
        self._rows_cols = F.tensor_view(self.shape)
        self._views = None  # state_arrays' cache: [(name, buffer, numpy view)]

    # -- state ---------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """numpy views of the integer buffers (CPU); writes through to the module."""
        bufs, views = self._buffers, self._views
        if views is None or any(bufs[n] is not t for n, t, _ in views):  # made once, again if a buffer is replaced
            views = [(n, bufs[n], bufs[n].numpy()) for n in self.clock.scheme.arrays()]
            ops.check_state({n: a for n, _, a in views}, self.shape, self.clock.scheme)  # what *_checked rely on
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
            from .kernels import triton_gpu

            return triton_gpu.materialize(self, dtype)
        out = torch.empty(self._rows_cols, dtype=torch.float32)  # state_arrays checked the buffers it views
        ops.materialize_checked(self.state_arrays(), self.clock.scheme, self.clock.step_counter, out.numpy())
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
            from .kernels import triton_gpu

            if self.clock.device_counts is None:
                self.clock.device_counts = triton_gpu.new_counters(grad.device)
            triton_gpu.vote_async(self, grad, self.clock.device_counts)
            return
        c = self.clock
        g2 = grad.detach().float().reshape(self._rows_cols).contiguous().numpy()
        st = ops.vote_checked(self.state_arrays(), g2, c.scheme, step_counter=c.step_counter, seed=c.seed,
                              tensor=self.tensor_index, scales=not c.freeze_scale)
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
        return F_.linear(x, w if torch.is_autocast_enabled(x.device.type) else w.to(x.dtype))

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
        return F_.embedding(idx, mod.materialize())

    @staticmethod
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        gw = torch.zeros(ctx.mod.shape, dtype=torch.float32, device=gy.device)
        gw.index_add_(0, idx.reshape(-1), gy.reshape(-1, gy.shape[-1]).float())
        ctx.mod._receive_grad(gw)
        return None, None, None


class E1TMLinear(_E1TMWeight):
    """Bias-free Linear ``y = x @ W_eff.T`` with E1TM integer state; optional float ``bias`` (user-trained)."""

    def __init__(self, in_features: int, out_features: int, clock: Clock, state=None, bias: torch.Tensor | None = None):
        super().__init__((out_features, in_features), clock, state)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        self._use()
        y = _LinearFn.apply(x, self._anchor, self)
        return y if self.bias is None else y + self.bias


class E1TMEmbedding(_E1TMWeight):
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


def e1tm_modules(model: nn.Module) -> dict[str, _E1TMWeight]:
    """name -> E1TM module, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _E1TMWeight)}


def model_clock(model: nn.Module) -> Clock:
    mods = e1tm_modules(model)
    if not mods:
        raise ConfigError("the model has no E1TM layers; call arbs.nn.ternarize_(model) first")
    clocks = {id(m.clock) for m in mods.values()}
    if len(clocks) != 1:
        raise ConfigError("the model's E1TM layers do not share one clock; ternarize the model in one call")
    return next(iter(mods.values())).clock


def ternarize_(
    model: nn.Module,
    format: str = F.DEFAULT_VARIANT,
    rule: str = "carry",
    *,
    K: int | None = None,
    theta: int | None = None,
    gain: int | None = None,
    horizon: int | None = None,
    vote_max: int | None = None,
    seed: int = 0,
    include=lambda name, module: True,
    report: dict | None = None,
) -> Clock:
    """Turn the nn.Linear and nn.Embedding layers of ``model`` into E1TM form, in place.

    Each weight is converted with the convert rule (ops.convert) at step 0. Embeddings keep an
    ``attend`` method if the original had one (a tied head). A Linear bias stays a float Parameter,
    trained by the user's own optimizer (it is not part of an E1TM checkpoint).

    Parameters
    ----------
    model : the module to change in place.
    format, rule, K, theta, gain, horizon, vote_max : the E1TM variant and update rule with its integer
        parameters (formats.RULES; for flip, ``arbs train`` uses ``arbs.train.FLIP_DEFAULTS`` and
        ``horizon=<your step count>``).
    seed : keys the flip rule's stochastic votes (with each tensor's index and the step).
    include : callable(name, module) -> bool selecting layers to convert.
    report : optional dict filled with name -> ops.ConvertStats.

    Returns
    -------
    Clock shared by all converted layers; ``step(model)`` advances it.
    """
    given = dict(K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max)
    given = {k: v for k, v in given.items() if v is not None}
    unused = F.unused_params(rule, given)
    if unused:
        raise ConfigError(f"rule {rule!r} takes no parameter {unused[0]} (its parameters: "
                          f"{', '.join(F.rule_spec(rule).params) or 'none'})")
    clock = Clock(F.make_scheme(format, rule, **given), seed=int(seed))
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, _E1TMWeight) and include(name, m)
    ]
    for name, m in targets:
        w = m.weight.detach().float().cpu().numpy()
        state, stats = ops.convert(w, clock.scheme, name=f"{name}.weight")
        if report is not None:
            report[f"{name}.weight"] = stats
        if isinstance(m, nn.Embedding):
            new = E1TMEmbedding(m.num_embeddings, m.embedding_dim, clock, state)
        else:
            new = E1TMLinear(m.in_features, m.out_features, clock, state, bias=m.bias)
        _set_submodule(model, name, new)
    for i, m in enumerate(e1tm_modules(model).values()):
        m.tensor_index = i
    return clock


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fuse_scales_(model: nn.Module) -> dict[str, int]:
    """Start the fuse phase: every E1TM tensor's scale becomes its fused value (E = rint(E + Xi), clipped
    to int8; corr_accum = 0) and later votes leave E and corr_accum alone, so the model trained from
    here on is exactly the one ``fuse`` exports. Idempotent. Returns {'groups', 'clipped', 'changed'}."""
    clock = model_clock(model)
    out = {"groups": 0, "clipped": 0, "changed": 0}
    with torch.no_grad():
        for m in e1tm_modules(model).values():
            arrays = _cpu_arrays(m)
            E_fused, st = ops.fuse(arrays, m.shape, clock.scheme, clock.step_counter)
            m.E.copy_(torch.from_numpy(E_fused))
            m.corr_accum.zero_()
            for k in out:
                out[k] += getattr(st, k)
    clock.freeze_scale = True
    return out


def step(model: nn.Module) -> int:
    """End one training step: vote any pending summed gradients, then step_counter += 1. Returns it."""
    clock = model_clock(model)
    for m in e1tm_modules(model).values():
        m.flush()
    clock.read_device_counts()
    clock.step_counter += 1
    clock.write_sched()
    return clock.step_counter


@contextlib.contextmanager
def accumulate(model: nn.Module):
    """Within this block gradients of several backward passes are summed; ``step(model)`` votes once."""
    clock = model_clock(model)
    clock.accumulating = True
    try:
        yield
    finally:
        clock.accumulating = False


def tensor_states(model: nn.Module) -> dict[str, tuple[tuple[int, ...], dict[str, np.ndarray]]]:
    """``"<module>.weight" -> (shape, arrays)`` copies of every E1TM weight's integer state."""
    return {
        f"{name}.weight": (m.shape, {k: v.copy() for k, v in _cpu_arrays(m).items()})
        for name, m in e1tm_modules(model).items()
    }


def _cpu_arrays(m: _E1TMWeight) -> dict[str, np.ndarray]:
    return {name: getattr(m, name).detach().cpu().numpy() for name in m.clock.scheme.arrays()}


def load_tensor_states(model: nn.Module, states: dict[str, dict[str, np.ndarray]], step_counter: int) -> None:
    """Copy integer arrays (``"<module>.weight" -> arrays``) into the model's E1TM layers."""
    mods = {f"{n}.weight": m for n, m in e1tm_modules(model).items()}
    missing, extra = set(mods) - set(states), set(states) - set(mods)
    if missing or extra:
        raise ConfigError(
            f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for name, m in mods.items():
        arrays = states[name]
        for k in m.clock.scheme.arrays():
            a = np.asarray(arrays[k])
            buf = getattr(m, k)
            if tuple(a.shape) != tuple(buf.shape):
                raise ConfigError(f"tensor {name!r} array {k!r} has shape {a.shape}; the model needs {tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(a))
    model_clock(model).step_counter = int(step_counter)


class GraphedStep:
    """One training step's forward, backward and every vote, captured once in a CUDA graph and replayed.

    ``loss = step(x, y)`` copies the inputs into the graph's static buffers, replays forward + backward
    (the votes are kernels in the graph, adding their counts to ``Clock.device_counts``), then runs
    :func:`step` (one sync: the counts, NaN/inf check, step_counter += 1). Python runs once per step
    instead of once per layer, which is where an eager step on a GPU spends most of its time.

    Valid while every kernel argument is fixed: the carry and flip rules (``Xi = corr_accum/(K*gs)``
    does not depend on the step; average's does) and one value of ``Clock.freeze_scale`` (the step is
    captured again when it changes). Building it runs two warm-up steps whose state changes are undone.

    Parameters
    ----------
    model : module with E1TM layers on one CUDA device.
    loss_fn : callable(*inputs) -> scalar loss tensor (runs inside ``autocast``).
    example_inputs : CUDA tensors of the shapes and dtypes every later call passes.
    autocast_dtype : dtype of ``torch.autocast`` around the forward, or None for none.
    """

    def __init__(self, model: nn.Module, loss_fn, *example_inputs: torch.Tensor,
                 autocast_dtype: torch.dtype | None = torch.bfloat16):
        self.model, self.loss_fn, self.clock = model, loss_fn, model_clock(model)
        if not graphable(model):
            raise ConfigError(f"a CUDA graph step needs the carry or flip rule and E1TM state on a GPU; "
                              f"this model has rule {self.clock.scheme.rule!r} on {self._device()}")
        self.autocast_dtype = autocast_dtype
        self.static = [x.detach().clone() for x in example_inputs]
        self._capture()

    def _device(self) -> torch.device:
        return next(iter(e1tm_modules(self.model).values())).T_packed.device

    def _body(self) -> torch.Tensor:
        on = self.autocast_dtype is not None
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=on, cache_enabled=False):
            loss = self.loss_fn(*self.static)
        loss.backward()
        return loss.detach()

    def _capture(self) -> None:
        clock, device = self.clock, self._device()
        saved = {(n, k): v.clone() for n, m in e1tm_modules(self.model).items() for k, v in m.named_buffers()}
        saved_clock = (clock.step_counter, dict(clock.stats))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuBLAS handles, Clock.device_counts
                self._body()
                step(self.model)
        torch.cuda.current_stream(device).wait_stream(side)
        mods = e1tm_modules(self.model)
        with torch.no_grad():  # undo the warm-up steps: the run continues from the state it had
            for (n, k), v in saved.items():
                getattr(mods[n], k).copy_(v)
        clock.step_counter, clock.stats = saved_clock[0], saved_clock[1]
        clock.write_sched()
        self.freeze_scale = clock.freeze_scale
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.clock.freeze_scale != self.freeze_scale:  # the fuse phase began: capture it anew
            self.graph.reset()
            self._capture()
        for s, x in zip(self.static, inputs, strict=True):
            s.copy_(x, non_blocking=True)
        self.graph.replay()
        step(self.model)
        return self.loss


def graphable(model: nn.Module) -> bool:
    """Whether :class:`GraphedStep` can capture ``model``'s step: E1TM layers on CUDA, rule carry or flip."""
    mods = e1tm_modules(model)
    clock = model_clock(model)
    on_cuda = all(m.T_packed.is_cuda for m in mods.values())
    return on_cuda and clock.scheme.xi_ratio(1) == clock.scheme.xi_ratio(2)
