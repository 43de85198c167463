"""Whole-model operations on E1TM layers: ternarize_, step, accumulate, the fuse phase, state in and out.

Usage::

    model = arbs.nn.ternarize_(model, format="E1TM32", rule="flip")  # the clock: arbs.nn.model_clock(model)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()          # votes happen here, layer by layer
        arbs.nn.step(model)      # flushes pending votes, step_counter += 1
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from .. import formats, ops
from ..errors import ConfigError
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
    format, rule, K, theta, gain, horizon, vote_max : the E1TM variant and update rule with its integer
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
    clock = Clock(formats.make_scheme(format, rule, K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max),
                  seed=int(seed))
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


def enter_fuse_phase_(model: nn.Module) -> dict[str, int]:
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
            m.invalidate()
            for k in out:
                out[k] += getattr(st, k)
    clock.fuse_phase = True
    return out


def step(model: nn.Module) -> int:
    """End one training step: vote any pending summed gradients, then step_counter += 1. Returns it."""
    clock = model_clock(model)
    for m in e1tm_modules(model).values():
        m.flush()
    if clock.device_counts is not None or clock.sched is not None:  # state on a GPU
        from . import cuda

        cuda.read_counts(clock)
        clock.step_counter += 1
        cuda.write_sched(clock)
    else:
        clock.step_counter += 1
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


def load_tensor_states(model: nn.Module, states: dict[str, dict[str, np.ndarray]], step_counter: int) -> None:
    """Copy integer arrays (``"<module>.weight" -> arrays``) into the model's E1TM layers."""
    mods = {_tensor_name(n): m for n, m in e1tm_modules(model).items()}
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
        m.invalidate()
    model_clock(model).step_counter = int(step_counter)
