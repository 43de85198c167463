"""torch.distributed glue for data-parallel E1TM training: exact integer vote sums across ranks.

Votes are small integers, so ranks SUM them exactly (``dist.all_reduce`` on int8/int32/int64 tensors, never
float, never AVG): the result does not depend on the reduction order and every rank applies the same update, by
default the mean vote (:func:`mean_votes`: the sum divided by the slot count, rounded by a counter-based hash).
:class:`Reducer` is what ``arbs.nn.step`` and the training loop call: it picks a wire dtype wide enough for the
largest possible sum (:func:`wire_dtype`), records the bytes it sends, compares hashes of the ranks' states, and
turns a failed collective (a rank died, hung past the timeout, lost its connection) into a
:class:`DistributedError` that says so.

Micro-batch slots: the global batch of a step is split into ``S = world * micro_batches`` slots; rank ``r``'s
``m``-th micro-batch is slot ``m * world + r`` (:func:`slot_of`), so 1 rank x S micro-batches and S ranks x 1
micro-batch vote on the same rows with the same draws (:func:`slot_seed`). Kernels never import this module.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os

import numpy as np
import torch

from . import schedule
from .errors import ArbsError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300  # a collective waiting longer than this on a dead or hung rank fails (gloo/NCCL timeout)
DEFAULT_CHECK_EVERY = 100  # steps between comparisons of the ranks' integer-state hashes


class DistributedError(ArbsError, RuntimeError):
    """A collective failed (another rank died, hung past the timeout or lost its connection), or the ranks
    disagree (different configs, different integer states)."""


def wire_dtype(bound: int) -> torch.dtype:
    """The narrowest integer dtype gloo and NCCL both sum that holds every value in [-bound, bound]: int8, int32 or
    int64 (gloo has no int16 SUM). Every partial sum of a SUM all-reduce is bounded by the total's bound, so no
    intermediate wraps either."""
    if bound < 0:
        raise ValueError(f"bound must be >= 0, got {bound}")
    if bound <= 127:
        return torch.int8
    if bound <= 2**31 - 1:
        return torch.int32
    if bound <= 2**63 - 1:
        return torch.int64
    raise ConfigError(f"vote sums may reach {bound}, beyond int64; use fewer ranks or micro-batches")


def slot_of(micro: int, rank: int, world: int) -> int:
    """The global slot of rank ``rank``'s ``micro``-th micro-batch in a step: ``micro * world + rank``."""
    return micro * world + rank


def slot_seed(seed: int, slot: int) -> int:
    """The seed that keys the flip rule's draws for micro-batch ``slot`` of a step: the run's seed for slot 0 (so
    one micro-batch per step draws exactly what a plain run draws), else ``mix64(seed ^ slot * GOLDEN64)``."""
    if slot == 0:
        return seed
    return schedule.mix64(seed ^ ((slot * schedule.GOLDEN64) & ((1 << 64) - 1)))


def mean_votes(sums: np.ndarray, slots: int, key: int) -> np.ndarray:
    """The mean vote: integer vote sums over ``slots`` micro-batch slots divided by ``slots``, stochastically
    rounded, so a step moves the state as far as one vote does on average whatever the slot count.

    Each element ``s = q * slots + r`` (``0 <= r < slots``) becomes ``q + 1`` when its draw
    ``h = mix64(key ^ (i * GOLDEN64 mod 2**64))`` (i: its C-order index) has ``h mod slots < r``, else ``q``: the
    expectation is ``s / slots`` (up to ``slots / 2**64``), the result lies between ``floor(s / slots)`` and
    ``ceil(s / slots)``, and it is a pure function of (the sum, slots, key): identical on every rank and in every
    layout with the same slot count. ``slots == 1`` returns the sums unchanged. ``key``:
    ``schedule.mean_vote_key(seed, tensor, step_counter, part)``.

    Parameters
    ----------
    sums : integer array, any shape: the exact vote sums (not modified).
    slots : int >= 1: the step's micro-batch slot count (world size x micro-batches).
    key : int, 0 <= key < 2**64.

    Returns
    -------
    int64 array of ``sums``' shape (a new array).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    s = np.asarray(sums).astype(np.int64)  # a copy
    if slots == 1 or s.size == 0:
        return s
    q, r = np.divmod(s, np.int64(slots))  # floor division: 0 <= r < slots, also for negative sums
    i = np.arange(s.size, dtype=np.uint64).reshape(s.shape)
    h = schedule.mix64_array(np.uint64(key) ^ (i * np.uint64(schedule.GOLDEN64)))
    return q + ((h % np.uint64(slots)) < r.astype(np.uint64))


def slot_rows(batch_size: int, slots: int, slot: int) -> slice:
    """Rows of the global batch that slot ``slot`` of ``slots`` takes (``batch_size`` divisible by ``slots``)."""
    if batch_size % slots:
        raise ConfigError(f"--batch-size {batch_size} does not split into {slots} micro-batch slots "
                          f"(world size x --micro-batches); use a multiple of {slots}")
    n = batch_size // slots
    return slice(slot * n, (slot + 1) * n)


def is_active(group=None) -> bool:
    """True when torch.distributed is initialized with more than one rank (in ``group``, default: the world)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from e


def init_from_env(device: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1 and none is initialized: gloo on the CPU, NCCL on a GPU (one device per
    rank: LOCAL_RANK). ``timeout_s``: how long a collective waits for a dead or hung rank before failing.
    Returns True when this call initialized it (the caller then destroys it)."""
    import torch.distributed as dist

    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} are not set; launch with "
                          "torchrun --nproc-per-node N -m arbs_cli train ... (docs/distributed.md)")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("process group: %s, rank %d of %d, timeout %d s", backend, dist.get_rank(), dist.get_world_size(),
             timeout_s)
    return True


def digest(chunks) -> int:
    """A signed 64-bit hash of byte chunks (numpy arrays, bytes): what ranks compare."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.tobytes() if isinstance(c, np.ndarray) else bytes(c))
    return int.from_bytes(h.digest()[:8], "little", signed=True)


class Reducer:
    """Sums integer votes (and float gradients, for the ``accumulate`` rule and float parameters) over the ranks
    of ``group`` (None: the default group). ``check_every``: steps between state-hash comparisons (0: never).

    ``sent`` lists ``(what, dtype, numel, bytes)`` of every all-reduce since :meth:`reset_sent`: the bytes on the
    wire per rank for one reduction, as the tensors were handed to torch.distributed.
    """

    def __init__(self, group=None, *, check_every: int = DEFAULT_CHECK_EVERY):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                              "(or launch with torchrun) before arbs.nn.data_parallel")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.check_every = int(check_every)
        self.sent: list[tuple[str, str, int, int]] = []
        self.checked = False  # the first step compares the ranks' states before applying anything

    @contextlib.contextmanager
    def collective(self, what: str):
        """Turn a failed collective into a DistributedError naming ``what`` and this rank."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo/NCCL: DistBackendError, "Connection closed by peer", timeouts
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died, hung past the process "
                f"group's timeout, or lost its connection ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from e

    def reset_sent(self) -> None:
        self.sent = []

    def sum_ints(self, arrays: list[np.ndarray], bound: int, what: str) -> list[np.ndarray]:
        """Exact elementwise sums over the ranks of integer ``arrays`` (each rank's same shapes, in the same order),
        sent as one flat tensor of ``wire_dtype(bound)``; ``bound``: the largest |sum| possible. Returns int64."""
        import torch.distributed as dist

        if not arrays:
            return []
        dtype = wire_dtype(bound)
        flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays])).to(dtype)
        self.sent.append((what, str(dtype).removeprefix("torch."), flat.numel(), flat.numel() * flat.element_size()))
        with self.collective(f"the all-reduce of {what}"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        out = flat.to(torch.int64).numpy()
        parts, o = [], 0
        for a in arrays:
            parts.append(out[o:o + a.size].reshape(a.shape))
            o += a.size
        return parts

    def sum_floats(self, tensors: list[torch.Tensor], what: str) -> None:
        """Sum float tensors over the ranks, in place (one flat float32 all-reduce per device)."""
        import torch.distributed as dist

        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        self.sent.append((what, "float32", flat.numel(), flat.numel() * 4))
        with self.collective(f"the all-reduce of {what}"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view(t.shape))
            o += t.numel()

    def sum_scalars(self, values: list[float], what: str) -> list[float]:
        """Sum a few float64 scalars over the ranks (losses, a stop flag)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        with self.collective(f"the all-reduce of {what}"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def same(self, value: int, what: str, *, hint: str = "") -> None:
        """DistributedError unless every rank passes the same 64-bit ``value`` (a hash of ``what``)."""
        import torch.distributed as dist

        mine = torch.tensor([value], dtype=torch.int64)
        got = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        with self.collective(f"the comparison of {what}"):
            dist.all_gather(got, mine, group=self.group)
        vals = [int(g.item()) for g in got]
        if len(set(vals)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(vals):
                groups.setdefault(v, []).append(r)
            split = "; ".join(f"ranks {rs} hash {v & ((1 << 64) - 1):016x}" for v, rs in groups.items())
            raise DistributedError(f"the ranks' {what} differ ({split}): every rank must hold the same. {hint}".strip())

    def broadcast_int(self, value: int, what: str, src: int = 0) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        with self.collective(f"the broadcast of {what}"):
            dist.broadcast(t, src=src, group=self.group)
        return int(t.item())

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        with self.collective(f"the barrier after {what}"):
            dist.barrier(group=self.group)
