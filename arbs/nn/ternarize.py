"""Whole-model operations on E1TM layers: ternarize_, step, accumulate, the fuse phase, state in and out
(save / load_ a whole model as an arbs checkpoint).

Usage::

    model = arbs.nn.ternarize_(model, format="E1TM32", rule="flip")  # the clock: arbs.nn.model_clock(model)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()          # votes happen here, layer by layer
        arbs.nn.step(model)      # flushes pending votes, step_counter += 1
    arbs.nn.save(model, "runs/mine")            # runs/mine/step_<N>: integer state + float parameters
    arbs.nn.load_(fresh_model, "runs/mine")     # fresh_model ternarized the same way; bit-exact
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import formats, ops, store
from ..errors import ConfigError, NonFiniteError
from .layers import (
    Clock,
    E1TMEmbedding,
    E1TMLinear,
    E1TMMultiheadAttention,
    E1TMTiedEmbedding,
    E1TMTiedLinear,
    E1TMWeight,
    e1tm_modules,
    model_clock,
)


def ternarize_(
    model: nn.Module,
    format: str = formats.DEFAULT_VARIANT,
    rule: str = formats.DEFAULT_RULE,
    *,
    K: int | None = None,
    theta: int | None = None,
    gain: int | None = None,
    horizon: int | None = None,
    vote_max: int | None = None,
    vote_norm: int | None = None,
    reset: int | None = None,
    seed: int = 0,
    include=lambda name, module: True,
    report: dict | None = None,
) -> nn.Module:
    """Turn the nn.Linear, nn.Embedding and nn.MultiheadAttention layers of ``model`` into E1TM form, in place.

    Each weight is converted with the convert rule (ops.convert) at step 0. Embeddings keep an
    ``attend`` method (a tied head). A Linear's bias stays the user's float Parameter (the same object),
    trained by their own optimizer; it is not part of an E1TM checkpoint. An nn.MultiheadAttention becomes an
    :class:`E1TMMultiheadAttention`: its packed ``in_proj_weight`` (or q/k/v_proj_weight) and its ``out_proj``
    become E1TM state, its biases stay the user's float Parameters; its ``out_proj`` is converted with it
    and never on its own. A converted layer still answers ``.weight`` (``in_proj_weight``) with W_eff:
    float32, read-only, a new tensor on each read (assigning to it raises AttributeError).

    Tied weights: modules that share one weight Parameter (``lm_head.weight is embed.weight``) share one E1TM
    state, made at the first of them in ``named_modules()`` order; the others become E1TMTiedLinear /
    E1TMTiedEmbedding using it (one set of buffers, one tensor_index, one checkpoint tensor), and the weight
    votes once per step on the sum of every use's gradient. A module reachable under several names is
    replaced under all of them.

    Parameters
    ----------
    model : the module to change in place; it may itself be a Linear, Embedding or MultiheadAttention, which
        is then replaced by the returned module.
    format, rule, K, theta, gain, horizon, vote_max, vote_norm, reset : the E1TM variant and update rule with its integer
        parameters (formats.RULES, formats.PARAMS; None takes the table's default; for flip pass
        ``horizon=<your step count>`` to end the vote schedule there, as ``arbs train`` does).
    seed : keys the flip rule's stochastic votes (with each tensor's index and the step).
    include : callable(name, module) -> bool selecting layers to convert (MultiheadAttention as a whole).
    report : optional dict filled with tensor name -> ops.ConvertStats.

    Returns
    -------
    The converted model: ``model`` itself, or its replacement when ``model`` was a layer converted whole.
    Use it as ``model = arbs.nn.ternarize_(model, ...)``. The clock shared by all converted layers (scheme,
    step_counter, stats) is ``arbs.nn.model_clock(model)``; ``step(model)`` advances it.
    """
    clock = Clock(formats.make_scheme(format, rule, K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max,
                                    vote_norm=vote_norm, reset=reset), seed=int(seed))
    with_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention))
        and not isinstance(m, (E1TMWeight, E1TMMultiheadAttention)) and id(m) not in with_attention
        and include(name, m)
    ]
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    owners: dict[int, tuple[torch.Tensor, E1TMWeight]] = {}  # id(float weight) -> (it, its E1TM module)

    def e1tm_state(w: torch.Tensor, name: str, make) -> tuple[E1TMWeight, bool]:
        """The E1TM module of float weight ``w`` (tensor ``name``): converted now by ``make(state)``, or the
        one made for an earlier module sharing ``w`` (then True: tied)."""
        hit = owners.get(id(w))
        if hit is not None:
            return hit[1], True
        state, stats = ops.convert(w.detach().float().cpu().numpy(), clock.scheme, name=name)
        if report is not None:
            report[name] = stats
        new = make(state)
        owners[id(w)] = (w, new)
        return new, False

    def linear(w, name, bias, in_features, out_features) -> nn.Module:
        src, tied = e1tm_state(w, name, lambda st: E1TMLinear(in_features, out_features, clock, st, bias=bias))
        return E1TMTiedLinear(src, bias=bias) if tied else src

    result = model
    for name, m in targets:
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None:
                shapes = {"in_proj": m.in_proj_weight}
            else:
                shapes = {"q_proj": m.q_proj_weight, "k_proj": m.k_proj_weight, "v_proj": m.v_proj_weight}
            proj = {k: linear(w, f"{prefix}{k}.weight", None, w.shape[1], w.shape[0]) for k, w in shapes.items()}
            out = m.out_proj
            proj["out_proj"] = linear(out.weight, f"{prefix}out_proj.weight", out.bias, out.in_features, out.out_features)
            new = E1TMMultiheadAttention(m, proj)
        elif isinstance(m, nn.Embedding):
            src, tied = e1tm_state(m.weight, f"{prefix}weight",
                                   lambda st, m=m: E1TMEmbedding(m.num_embeddings, m.embedding_dim, clock, st))
            new = E1TMTiedEmbedding(src) if tied else src
        else:
            new = linear(m.weight, f"{prefix}weight", m.bias, m.in_features, m.out_features)
        for path in paths[id(m)]:
            if path:
                _set_submodule(model, path, new)
            else:
                result = new
    for i, m in enumerate(e1tm_modules(result).values()):
        m.tensor_index = i
    return result


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def enter_fuse_phase_(model: nn.Module, grid: int | None = None) -> dict[str, int]:
    """Start the fuse phase: every E1TM tensor's scale becomes its fused value (E = rint(E + Xi), clipped
    to int8; corr_accum = 0) and later votes leave E and corr_accum alone, so the model trained from
    here on is exactly the one ``fuse`` exports. With ``grid`` (a multiple of gs, e.g. 256) every ``grid``
    consecutive weights of a row share one E (:func:`arbs.ops.fuse_to_grid`), so the trained model is one
    that GGUF's TQ1_0/TQ2_0 hold exactly. Idempotent. Returns {'groups', 'clipped', 'changed'}."""
    clock = model_clock(model)
    out = {"groups": 0, "clipped": 0, "changed": 0}
    with torch.no_grad():
        for m in e1tm_modules(model).values():
            arrays = _cpu_arrays(m)
            if grid is None:
                E_fused, st = ops.fuse(arrays, m.shape, clock.scheme, clock.step_counter)
            else:
                E_fused, st = ops.fuse_to_grid(arrays, m.shape, clock.scheme, clock.step_counter, block=grid)
            m.E.copy_(torch.from_numpy(E_fused))
            m.corr_accum.zero_()
            m.invalidate()
            for k in out:
                out[k] += getattr(st, k)
    clock.fuse_phase = True
    return out


def step(model: nn.Module) -> int:
    """End one training step: vote any pending summed gradients, then step_counter += 1. Returns it.

    With integer vote sums (inside :func:`micro_batches`, or when torch.distributed is initialized with several
    ranks: :func:`data_parallel`) the votes every backward kept as integer counts are summed (over the ranks:
    an exact integer all-reduce), divided by the slot count for the mean vote (the default) and applied once,
    the same on every rank. Under torch.distributed, gradients
    summed inside :func:`accumulate` are all-reduced (float32 SUM) before their one vote."""
    clock = model_clock(model)
    mods = e1tm_modules(_unwrap_ddp(model, clock))
    red = _reducer(clock)
    pending = [m for m in mods.values() if m._grad_sum is not None] if red is not None else []
    if pending:  # accumulate under torch.distributed: one vote on the ranks' summed float gradient
        for m in pending:
            m._grad_sum = m._grad_sum.detach().float().contiguous()
        red.sum_floats([m._grad_sum for m in pending], "summed float gradients (accumulate)")
        for m in pending:
            m.flush(count=False)
    for m in mods.values():
        m.flush()
    if (clock.vote_sum or red is not None) and not pending:
        _apply_vote_sums(mods, clock, red)
    if clock.device_counts is not None or clock.sched is not None:  # state on a GPU
        from . import cuda

        cuda.read_counts(clock)
        clock.step_counter += 1
        cuda.write_sched(clock)
    else:
        clock.step_counter += 1
    if red is not None and red.check_every and clock.step_counter % red.check_every == 0:
        check_ranks(model)
    return clock.step_counter


def _unwrap_ddp(model: nn.Module, clock: Clock) -> nn.Module:
    """``model``, or the module a DistributedDataParallel wraps, after checking that DDP reduces over the ranks
    arbs sums the votes over (DDP handles float parameters only; arbs the E1TM votes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return model
    red = _reducer(clock)
    if red is None:
        raise ConfigError("the model is wrapped in DistributedDataParallel but no process group with several ranks "
                          "is active, so arbs cannot sum the E1TM votes; initialize torch.distributed first")
    import torch.distributed as dist

    ddp_ranks = dist.get_process_group_ranks(model.process_group)
    arbs_ranks = dist.get_process_group_ranks(red.group or dist.group.WORLD)
    if sorted(ddp_ranks) != sorted(arbs_ranks):
        raise ConfigError(
            f"DistributedDataParallel reduces over ranks {sorted(ddp_ranks)} but arbs sums this model's E1TM votes "
            f"over ranks {sorted(arbs_ranks)}: the E1TM weights would train on other ranks than the float ones. "
            "Pass the same group to both: arbs.nn.data_parallel(model, group=...) and DDP(..., process_group=...)")
    return model.module


def _reducer(clock: Clock):
    """The clock's Reducer: the one :func:`data_parallel` set, else one over the default group when
    torch.distributed is initialized with several ranks (every rank then sums its votes), else None."""
    if clock.reducer is None:
        from .. import distributed

        if distributed.is_active():
            clock.reducer = distributed.Reducer()
            clock.vote_sum = True
    return clock.reducer


def _apply_vote_sums(mods: dict[str, E1TMWeight], clock: Clock, red) -> None:
    """Sum every layer's integer vote counts over the micro-batches (and the ranks), divide them by the slot count
    (``clock.vote_mean``) and apply them once."""
    from .layers import vote_plan

    plan = vote_plan(clock)
    gs = clock.scheme.gs
    nonfinite = sum(m._nonfinite for m in mods.values())
    micro = max((m._micro for m in mods.values()), default=0)
    for m in mods.values():
        m._nonfinite = 0
    counts = [m.take_counts(plan) for m in mods.values()]
    deltas = [d for d, _ in counts if d is not None]
    trits = [t for _, t in counts if t is not None]
    slots = micro
    if red is not None:
        if not red.checked:  # before the first update: the ranks start from the same state and rule
            red.same(state_digest(mods, clock), "integer states at the first step",
                     hint="Start every rank from the same checkpoint (or the same seed and init)")
            red.checked = True
        control = red.sum_ints([np.array([nonfinite, micro], np.int64)], 2**62, "the step's control counts")[0]
        nonfinite, slots = int(control[0]), int(control[1])
        deltas = red.sum_ints(deltas, slots * gs, "scale votes (corr_accum deltas)")
        trits = red.sum_ints(trits, slots * plan.trit_max, "trit votes (flip_accum steps)")
    if nonfinite:
        raise NonFiniteError(f"{nonfinite} micro-batch gradient(s) of E1TM weights held NaN/inf at step "
                             f"{clock.step_counter}; no vote of this step was applied")
    if clock.vote_mean and slots > 1:  # the mean vote: the exact sums divided by S, rounded by the counter hash
        deltas, trits = _mean_votes(mods, clock, slots, deltas, trits, plan)
    it_d, it_t = iter(deltas), iter(trits)
    for m in mods.values():
        m.apply_counts(next(it_d) if plan.scales else None, next(it_t) if plan.trits else None)


def _mean_votes(mods: dict[str, E1TMWeight], clock: Clock, slots: int, deltas: list, trits: list, plan):
    """The step's summed votes divided by ``slots``, each element stochastically rounded with draws keyed by
    (seed, tensor_index, step_counter) alone (``arbs.distributed.mean_votes``): the same on every rank and in every
    layout of the same slot count."""
    from .. import distributed, schedule

    def mean(counts, part):
        return [distributed.mean_votes(a, slots, schedule.mean_vote_key(clock.seed, m.tensor_index,
                                                                         clock.step_counter, part))
                for m, a in zip(mods.values(), counts, strict=True)]

    return (mean(deltas, "scales") if plan.scales else deltas,
            mean(trits, "trits") if plan.trits else trits)


def state_digest(model_or_mods, clock: Clock | None = None) -> int:
    """A 64-bit hash of a model's E1TM integer state, rule, step_counter, seed and fuse phase: what data-parallel
    ranks compare."""
    from .. import distributed

    mods = model_or_mods if isinstance(model_or_mods, dict) else e1tm_modules(model_or_mods)
    clock = clock if clock is not None else next(iter(mods.values())).clock
    head = repr((clock.scheme, clock.step_counter, clock.seed, clock.fuse_phase)).encode()
    return distributed.digest([head, *(a for m in mods.values() for a in _cpu_arrays(m).values())])


@contextlib.contextmanager
def micro_batches(model: nn.Module, *, mean: bool = True):
    """Within this block every backward votes on its own gradient into integer counts (one micro-batch each) and
    ``step(model)`` applies them once: N ranks x M micro-batches == 1 rank x N*M, bit for bit. Under
    torch.distributed with several ranks this is how every step votes anyway (:func:`data_parallel`).

    ``mean`` (default): the exact sum over the S slots of the step (micro-batches x ranks) is divided by S with
    deterministic stochastic rounding (``arbs.distributed.mean_votes``), so a step moves the state as far as one
    vote on average; S = 1 is the plain vote. False: the plain sum is applied (S times as far)."""
    clock = model_clock(model)
    before = clock.vote_sum, clock.vote_mean
    clock.vote_sum, clock.vote_mean = True, bool(mean)
    try:
        yield
    finally:
        clock.vote_sum, clock.vote_mean = before


def data_parallel(model: nn.Module, group=None, *, check_every: int | None = None, mean: bool = True) -> nn.Module:
    """Sum this model's E1TM votes over the ranks of ``group`` (None: the default process group) at every
    ``step(model)``, exactly (integer all-reduce), and compare a hash of the ranks' integer state at the first
    step and every ``check_every`` steps (default ``arbs.distributed.DEFAULT_CHECK_EVERY``; 0: never).
    ``mean`` (default): apply the mean vote, the sum divided by the slot count with deterministic stochastic
    rounding (see :func:`micro_batches`); False: apply the plain sum.

    Without this call the same happens over the default group whenever torch.distributed is initialized with
    several ranks; call it to pick another group or the check cadence. Float parameters are yours: wrap the
    model in DistributedDataParallel for them (its process group must be the same). Returns ``model``."""
    from .. import distributed

    clock = model_clock(model)
    red = distributed.Reducer(group, **({} if check_every is None else {"check_every": check_every}))
    clock.reducer = red
    clock.vote_sum, clock.vote_mean = True, bool(mean)
    return model


def check_ranks(model: nn.Module) -> None:
    """Under data parallelism: DistributedError unless every rank holds the same integer state now."""
    clock = model_clock(model)
    red = _reducer(clock)
    if red is not None:
        red.same(state_digest(model), f"integer states at step {clock.step_counter}",
                 hint="the ranks diverged: a rank voted without the all-reduce, or its state was changed outside "
                      "arbs.nn.step; resume every rank from the last checkpoint")


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
    """``"<module>.weight" -> (shape, arrays)`` copies of every E1TM weight's integer state (a tied weight
    once, under the module that holds its state; ``"weight"`` for a converted bare layer)."""
    return {
        _tensor_name(name): (m.shape, {k: v.copy() for k, v in _cpu_arrays(m).items()})
        for name, m in e1tm_modules(model).items()
    }


def _tensor_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _cpu_arrays(m: E1TMWeight) -> dict[str, np.ndarray]:
    return {name: getattr(m, name).detach().cpu().numpy() for name in m.clock.scheme.arrays()}


def load_tensor_states(model: nn.Module, states: dict[str, dict[str, np.ndarray]], step_counter: int, *,
                       shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Copy integer arrays (``"<module>.weight" -> arrays``) into the model's E1TM layers.

    ``shapes``: the logical shape of each tensor, checked against the model's (array shapes alone cannot tell
    two widths that pad to the same groups apart). Everything is checked before anything is copied.
    """
    mods = {_tensor_name(n): m for n, m in e1tm_modules(model).items()}
    missing, extra = set(mods) - set(states), set(states) - set(mods)
    if missing or extra:
        raise ConfigError(
            f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for name, m in mods.items():
        if shapes is not None and tuple(shapes[name]) != m.shape:
            raise ConfigError(f"tensor {name!r} has shape {tuple(shapes[name])} in the checkpoint; the model's is {m.shape}")
        for k in m.clock.scheme.arrays():
            if k not in states[name]:
                raise ConfigError(f"tensor {name!r} lacks array {k!r}, which rule {m.clock.scheme.rule!r} needs")
            a, buf = states[name][k], getattr(m, k)
            if tuple(np.shape(a)) != tuple(buf.shape):
                raise ConfigError(f"tensor {name!r} array {k!r} has shape {np.shape(a)}; the model needs {tuple(buf.shape)}")
    for name, m in mods.items():
        for k in m.clock.scheme.arrays():
            getattr(m, k).copy_(torch.from_numpy(np.asarray(states[name][k])))
        m.invalidate()
    clock = model_clock(model)
    clock.step_counter = int(step_counter)
    if clock.sched is not None:  # the GPU's copy of the step (vote schedule)
        from . import cuda

        cuda.write_sched(clock)


# -- save / load_ a whole model --------------------------------------------------------------------------------

NN_META_KEY = "arbs.nn"  # what save records in the checkpoint's meta: {"fuse_phase": bool, "seed": int}


def float_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> the model's float parameters, as ``model.named_parameters()`` lists them (a shared one once):
    everything a ternarized model keeps besides its E1TM integer state (biases, norm gains, an
    un-ternarized head), trainable or not. Empty for every model arbs builds."""
    return dict(model.named_parameters())


def save(model: nn.Module, run_dir, *, meta: Mapping | None = None, keep: int | None = None) -> Path:
    """Save a ternarized model as a committed checkpoint ``run_dir/step_<step_counter>``.

    The checkpoint holds every E1TM layer's integer state, the step_counter, format, rule and rule_params of the
    model's clock and, apart from them (``Checkpoint.float_params``, the ``_float`` group of SPEC.md §11), the
    model's float parameters (:func:`float_parameters`; none: the checkpoint is integer-only). ``meta`` (a JSON-able
    dict, yours) is kept; ``meta["arbs.nn"]`` records the clock's seed and whether the fuse phase has started.
    Written by ``arbs.store.save_checkpoint``: validated, atomic, under the run's writer lock, LATEST moved,
    ``keep`` newest checkpoints kept (None: all). Call it between steps (after ``arbs.nn.step(model)``).
    Float buffers (BatchNorm running statistics) are not saved.

    Returns the checkpoint directory. Raises ConfigError (no E1TM layers, votes pending, a reserved meta key,
    a non-float parameter), RunLockedError (another writer), ArbsError (``step_<N>`` exists: checkpoints are never
    overwritten).
    """
    clock = model_clock(model)
    mods = e1tm_modules(model)
    pending = [n for n, m in mods.items() if m._grad_sum is not None or m._counts is not None]
    if pending:
        raise ConfigError(f"the model has gradients not yet voted on (inside arbs.nn.accumulate?) in {pending[:3]}; "
                          "call arbs.nn.step(model) before saving")
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
        raise ConfigError(f"meta is a {type(meta).__name__}; expected a dict")
    if NN_META_KEY in meta:
        raise ConfigError(f"meta key {NN_META_KEY!r} is reserved: arbs.nn.save records the clock's seed and fuse "
                          "phase there")
    floats = {}
    for name, p in float_parameters(model).items():
        if not p.is_floating_point():
            raise ConfigError(f"parameter {name!r} has dtype {p.dtype}; arbs.nn.save keeps float parameters only")
        t = p.detach().cpu()
        floats[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()  # bf16 -> float32: exact
    s = clock.scheme
    ckpt = store.Checkpoint(
        kind="e1tm", format=s.format, gs=s.gs, rule=s.rule, rule_params=dict(s.params), fused=False,
        step_counter=int(clock.step_counter),
        tensors={n: store.TensorState(name=n, shape=shape, arrays=a) for n, (shape, a) in tensor_states(model).items()},
        meta={**meta, NN_META_KEY: {"fuse_phase": bool(clock.fuse_phase), "seed": int(clock.seed)}},
        float_params=floats,
    )
    return store.save_checkpoint(run_dir, ckpt, keep=keep)


def load_(model: nn.Module, ckpt_or_path) -> store.Checkpoint:
    """Restore a checkpoint of :func:`save` (or any E1TM training checkpoint) into ``model``, bit for bit.

    ``model`` must be ternarized the same way: the same format, rule and rule_params (else ConfigError with
    both values), the same E1TM tensors with the same shapes and the same float parameters (names and shapes;
    a float parameter is cast to the model's dtype). Everything is checked before anything changes. Restored:
    every E1TM layer's integer state, the step_counter, the float parameters and, when the checkpoint records
    them (``save`` does: ``meta["arbs.nn"]``), the clock's seed and fuse phase, so training continues exactly as
    the saved model would have. A checkpoint without that record (``arbs train``, whose loop re-derives the fuse
    phase from the step; ``arbs convert``) leaves the seed as it is and the fuse phase off.

    ``ckpt_or_path``: a ``store.Checkpoint``, a ``step_<N>`` directory or a run directory (its newest committed
    checkpoint that verifies). Returns the checkpoint loaded (its ``meta`` is yours again).
    """
    if isinstance(ckpt_or_path, store.Checkpoint):
        ck = ckpt_or_path
        if ck.path is None:  # in memory: validate it as a save would
            store.check_checkpoint(ck)
    else:
        ck = store.open_checkpoint(ckpt_or_path, kind="e1tm")
    where = f"'{ck.path}'" if ck.path is not None else "the checkpoint"
    clock = model_clock(model)
    s = clock.scheme
    if ck.kind != "e1tm":
        raise ConfigError(f"{where} is a float (baseline) checkpoint; arbs.nn.load_ loads E1TM checkpoints")
    if ck.fused:
        raise ConfigError(f"{where} is fused (inference only: T_packed and E, no step_counter), so it cannot resume "
                          "training; load a training checkpoint (arbs.fuse.checkpoint_weights gives a fused one's W_eff)")
    how = f"arbs.nn.ternarize_(model, {ck.format!r}, {ck.rule!r}, **{dict(ck.rule_params)})"
    if ck.format != s.format or ck.rule != s.rule:
        raise ConfigError(f"{where} holds format {ck.format!r} rule {ck.rule!r}, but the model was ternarized with "
                          f"format {s.format!r} rule {s.rule!r}; ternarize a fresh model with {how}")
    differ = [f"{k}={ck.rule_params.get(k)!r} (model: {s.params.get(k)!r})"
              for k in sorted(set(ck.rule_params) | set(s.params)) if ck.rule_params.get(k) != s.params.get(k)]
    if differ:
        raise ConfigError(f"{where} was saved with rule parameters {', '.join(differ)}; ternarize a fresh model "
                          f"with {how}")
    shapes = {n: m.shape for n, m in e1tm_modules(model).items()}
    shapes = {_tensor_name(n): shape for n, shape in shapes.items()}
    missing, extra = sorted(set(shapes) - set(ck.tensors)), sorted(set(ck.tensors) - set(shapes))
    if missing or extra:
        raise ConfigError(f"{where} does not match the model's E1TM tensors: the model's {missing[:5]} are not in it, "
                          f"its {extra[:5]} are not in the model (ternarize the same layers: include=...)")
    for n, shape in shapes.items():
        if tuple(ck.tensors[n].shape) != shape:
            raise ConfigError(f"tensor {n!r} has shape {tuple(ck.tensors[n].shape)} in {where}; the model's is {shape}")
    params = float_parameters(model)
    missing, extra = sorted(set(params) - set(ck.float_params)), sorted(set(ck.float_params) - set(params))
    if missing or extra:
        raise ConfigError(f"{where} does not match the model's float parameters: the model's {missing[:5]} are not "
                          f"in it, its {extra[:5]} are not in the model")
    for n, p in params.items():
        if tuple(ck.float_params[n].shape) != tuple(p.shape):
            raise ConfigError(f"float parameter {n!r} has shape {tuple(ck.float_params[n].shape)} in {where}; the "
                              f"model's is {tuple(p.shape)}")
    fuse_phase, seed = _nn_record(ck, where)
    if fuse_phase:
        unfused = [n for n, t in ck.tensors.items() if np.any(t.arrays["corr_accum"])]
        if unfused:
            raise ConfigError(f"{where} records the fuse phase, but tensor {unfused[0]!r} has a nonzero corr_accum "
                              "(fused scales have none); the checkpoint's meta was edited")
    load_tensor_states(model, {n: t.arrays for n, t in ck.tensors.items()}, ck.step_counter, shapes=shapes)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(ck.float_params[n])))
    clock.fuse_phase = fuse_phase
    if seed is not None:
        clock.seed = seed
    return ck


def _nn_record(ck: store.Checkpoint, where: str) -> tuple[bool, int | None]:
    """(fuse_phase, seed) that :func:`save` recorded in ``meta["arbs.nn"]``; (False, None) without a record."""
    rec = ck.meta.get(NN_META_KEY) if isinstance(ck.meta, Mapping) else None
    if rec is None:
        return False, None
    fuse_phase, seed = (rec.get("fuse_phase"), rec.get("seed")) if isinstance(rec, Mapping) else (None, None)
    if not isinstance(fuse_phase, bool) or isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where} has meta[{NN_META_KEY!r}] = {str(rec)[:100]}; expected "
                          "{'fuse_phase': true/false, 'seed': an integer}")
    return fuse_phase, seed
