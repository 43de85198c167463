"""E1TM layers on a CUDA device: what the Triton kernels need from a layer and its clock.

The kernels (arbs.kernels.triton_gpu) take tensors; this module takes an E1TM layer, finds its
tensors and its scheme, and keeps the clock's two device tensors:

- ``clock.device_counts``: every layer's vote adds its counts to this one int64 tensor (no sync per
  layer); :func:`read_counts` reads it once per step (one 40-byte copy) and raises if a vote was refused.
- ``clock.sched``: float64 [step_counter, flip vote gain at that step], read by the flip kernel; written
  from the host after every step, so a CUDA graph captured once reads the current values.
"""

from __future__ import annotations

import torch

from .. import formats, schedule
from ..errors import ConfigError, IntegerRangeError, NonFiniteError
from ..kernels import triton_gpu
from ..ops import VoteStats


def _out_dtype(device: torch.device, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def materialize(layer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ephemeral W_eff of E1TM ``layer`` in its logical shape, on the device of its buffers.

    dtype: float32 by default; inside an enabled ``torch.autocast`` on that device type, the autocast
    dtype (bfloat16 usually), which halves the bytes written and skips the cast F.linear would make.
    Pass ``dtype`` to choose explicitly. Launches one kernel, no sync.
    """
    scheme = layer.clock.scheme
    rows, cols = formats.tensor_view(layer.shape)
    tp = layer.T_packed
    out = torch.empty(layer.shape, dtype=_out_dtype(tp.device, dtype), device=tp.device)
    num, den = scheme.xi_ratio(layer.clock.step_counter)
    triton_gpu.launch_materialize(tp, layer.E, layer.corr_accum, scheme.gs, num, den, out.view(rows, cols))
    return out


def sched(clock, device) -> torch.Tensor:
    """The clock's float64 device tensor [step_counter, flip vote gain at that step].

    Written from the host here, except while a CUDA graph is being captured (the graph then reads
    what :func:`write_sched` writes after every replay)."""
    if clock.sched is None or clock.sched.device != torch.device(device):
        clock.sched = torch.zeros(2, dtype=torch.float64, device=device)
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        write_sched(clock)
    return clock.sched


def write_sched(clock) -> None:
    if clock.sched is not None:
        gain_m = schedule.trit_vote_gain(clock.scheme.params, clock.step_counter)
        clock.sched.copy_(torch.tensor([float(clock.step_counter), gain_m], dtype=torch.float64))


def vote_async(layer, grad: torch.Tensor) -> torch.Tensor:
    """Launch the whole vote of ``layer`` on ``grad`` (the gradient of W_eff) without any sync.

    The counts [nonfinite, out_of_range, carries, saturations, flips] are added to
    ``clock.device_counts`` (created on first use), which is returned. The state changes only while
    counts[0] (nonfinite) and counts[1] (out_of_range) are 0, tested on the device: once one layer's
    gradient holds NaN/inf no later layer votes, as when the CPU path raises. :func:`read_counts` must
    run before the votes are trusted.
    """
    clock, scheme = layer.clock, layer.clock.scheme
    rows, cols = formats.tensor_view(layer.shape)
    if tuple(grad.shape) != tuple(layer.shape):
        raise ValueError(f"gradient has shape {tuple(grad.shape)}; the weight's shape is {tuple(layer.shape)}")
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"gradient has dtype {grad.dtype}; expected a floating-point dtype")
    if grad.device != layer.T_packed.device:
        raise ConfigError(f"gradient is on {grad.device} but the E1TM state is on {layer.T_packed.device}")
    g2 = grad.detach().contiguous().view(rows, cols)
    corr = layer.corr_accum
    if clock.device_counts is None:
        clock.device_counts = triton_gpu.new_counters(corr.device)
    counters = clock.device_counts
    delta = torch.empty(corr.shape, dtype=torch.int64, device=corr.device)
    limit = scheme.carry_limit
    triton_gpu.launch_vote(g2, layer.T_packed, scheme.gs, delta, counters, corr_accum=corr if limit == 0 else None)
    if not clock.fuse_phase:
        triton_gpu.launch_apply(corr, layer.E, delta, limit, counters, guarded=True)
    if "flip_accum" in scheme.arrays():
        sch = sched(clock, corr.device) if scheme.params["gain"] else None
        base = schedule.vote_base(clock.seed, layer.tensor_index)
        triton_gpu.launch_flip(g2, layer.T_packed, layer.flip_accum, scheme.params["theta"], counters, guarded=True,
                               sched=sch, base=base, vote_max=scheme.params["vote_max"],
                               tensor_norm=scheme.params["vote_norm"] == 1, reset=scheme.params["reset"])
    return counters


def read_counts(clock) -> VoteStats:
    """Fold the step's device counts into ``clock.stats``, zero them (one sync) and return them.

    Raises NonFiniteError if a gradient held NaN/inf, IntegerRangeError if an average-rule corr_accum was
    within gs of the int64 limit: in both cases the kernels changed no state from that vote on.
    """
    if clock.device_counts is None:
        return VoteStats(0, 0, 0)
    try:
        nonfinite, oor, carries, sats, flips = clock.device_counts.tolist()
    finally:
        clock.device_counts.zero_()
    if nonfinite:
        raise NonFiniteError(f"a weight gradient holds {nonfinite} NaN/inf value(s); "
                             "no vote was applied from that layer on")
    if oor:
        raise IntegerRangeError(f"{oor} corr_accum value(s) are within gs of the int64 limit; "
                                "no vote was applied from that layer on")
    st = VoteStats(carries, sats, flips)
    for k in clock.stats:
        clock.stats[k] += getattr(st, k)
    return st


def vote(layer, grad: torch.Tensor) -> VoteStats:
    """The rule's integer update of ``layer`` from ``grad`` with one sync, as arbs.ops.vote.

    A NaN/inf in ``grad`` raises NonFiniteError and leaves every buffer untouched; for the average rule
    a corr_accum within gs of the int64 limit raises IntegerRangeError, also before any change.
    """
    vote_async(layer, grad)
    return read_counts(layer.clock)
