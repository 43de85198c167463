"""The one training loop: model + integer votes (E1TM) or an optimizer (float baselines) + data -> steps,
evaluations and checkpoints, with callbacks for progress. It draws nothing: the CLI plots the metrics.

Data order and every random choice derive from (seed, step), so a resumed run is bit-identical to an
uninterrupted one.

Data parallel (torchrun, docs/distributed.md): the global batch of a step is split into world size x
``micro_batches`` slots; rank r's m-th micro-batch is slot ``m * world + r``. E1TM votes are summed exactly
(integer all-reduce, ``arbs.nn.step``) and, by default, divided by the slot count (the mean vote), float baselines' gradients with a float32 SUM all-reduce. Rank 0 takes the
writer lock and writes checkpoints and metrics; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import data as data_mod
from .. import distributed, formats, schedule, store
from .. import nn as arbs_nn
from ..errors import ArbsError, ConfigError, NonFiniteError
from .build import autocast, build, fused_model, hf_run_record, run_corpus, to_checkpoint
from .config import IDENTITY_KEYS, TrainConfig, check_resume, run_meta
from .evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    val_loss: float  # nats/byte
    val_loss_fused: float | None  # E1TM: validation loss after fuse
    fuse_gap: float | None
    ms_per_step: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)

    @property
    def val_bpb(self) -> float:
        return self.val_loss / math.log(2)


def train(cfg: TrainConfig, *, on_step: Callable[[dict], None] | None = None, on_eval=None) -> TrainResult:
    """Train per ``cfg``; checkpoints and metrics.jsonl go to ``cfg.out``.

    ``on_step(record)`` is called after every step (for a progress bar); ``on_eval(record)`` after every
    evaluation. Ctrl-C finishes the current step, saves a checkpoint and returns with interrupted=True.
    A NaN/inf loss raises NonFiniteError without saving: the last good checkpoint stays as it was.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    owns_group = distributed.init_from_env(cfg.device, cfg.dist_timeout)  # torchrun: WORLD_SIZE > 1
    try:
        red = distributed.Reducer() if distributed.is_active() else None
        if red is not None:
            red.same(_config_digest(cfg), "training configs",
                     hint="Start every rank with the same options (torchrun passes the same command line to each)")
            if red.rank != 0:  # rank 0 writes; the others read the run and follow
                return _guarded(cfg, run_dir, None, None, red)
        with store.run_lock(run_dir):  # one writer per run: a second one fails at once, naming this process
            return _guarded(cfg, run_dir, on_step, on_eval, red)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _config_digest(cfg: TrainConfig) -> int:
    """What ranks compare before they start: every option but --threads (a per-machine setting)."""
    import dataclasses
    import json

    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}
    return distributed.digest([json.dumps(d, sort_keys=True, default=str).encode()])


def _guarded(cfg: TrainConfig, run_dir: Path, on_step, on_eval, red) -> TrainResult:
    try:
        return _train(cfg, run_dir, on_step, on_eval, red)
    except distributed.DistributedError as e:
        raise distributed.DistributedError(
            f"{e}. The last committed checkpoint in {run_dir} is intact: resume every rank with "
            f"arbs train --resume --out {run_dir}") from e


def _train(cfg: TrainConfig, run_dir: Path, on_step, on_eval, red=None) -> TrainResult:
    rank0 = red is None or red.rank == 0
    world = 1 if red is None else red.world
    if cfg.model and not rank0:
        red.barrier("rank 0 reading the Hugging Face run record")
    hf = (hf_run_record(cfg.model, context=cfg.context, run_dir=run_dir, resume=cfg.resume, writer=rank0)
          if cfg.model else None)
    if cfg.model and rank0 and red is not None:
        red.barrier("rank 0 reading the Hugging Face run record")
    context = hf["model"]["context"] if hf else cfg.model_config().context
    corpus = _corpus(cfg, context, hf, run_dir)
    meta = run_meta(cfg, corpus.info, hf)
    if rank0:
        meta, ckpt, micro = _open_run(cfg, meta, run_dir, world)
    if red is not None:  # the others open the checkpoint rank 0 chose (it may have moved a damaged one aside)
        chosen = red.broadcast_int(ckpt.step_counter if rank0 and ckpt is not None else -1, "the checkpoint to resume")
        if not rank0:
            meta, ckpt, micro = _open_run(cfg, meta, run_dir, world, step=chosen)
    model, handles = build(meta, ckpt, device=cfg.device)
    step = ckpt.step_counter if ckpt is not None else 0
    slots = world * micro
    clock = handles.get("clock")
    if clock is not None and red is not None:
        arbs_nn.data_parallel(model, mean=cfg.micro_batch_votes != "sum")
    elif clock is not None and slots > 1 and cfg.micro_batch_votes != "accumulate":
        clock.vote_sum, clock.vote_mean = True, cfg.micro_batch_votes == "mean"

    def save(step: int) -> None:
        if rank0:
            store.save_checkpoint(run_dir, to_checkpoint(model, handles, meta, step), keep=cfg.keep)
        if red is not None:
            red.barrier(f"rank 0 saving step {step}")

    def val_loss_of(m) -> float:  # rank 0 evaluates; the others get its figure
        v = evaluate(m, corpus.val, batch_size=cfg.batch_size, context=context, max_batches=cfg.eval_batches,
                     device=cfg.device) if rank0 else 0.0
        return v if red is None else red.sum_scalars([v], "the validation loss")[0]

    def metrics(rec: dict) -> None:
        if rank0:
            _append_metrics(run_dir, rec)

    if ckpt is None:
        save(0)
    _warn_if_schedule_ended(clock, step, cfg.steps)
    one_step = _Stepper(cfg, model, handles, run_dir, red=red, micro=micro)
    history, last_loss, val_loss, timer = [], float("nan"), None, _Timer()
    stopping = False
    with _sigint_stops() as stop:
        while step < cfg.steps and not stopping:
            x, y = data_mod.get_batch(corpus.train, batch_size=cfg.batch_size, context=context, seed=cfg.seed, step=step)
            x, y = x.to(cfg.device), y.to(cfg.device)
            t0 = time.perf_counter()
            last_loss, stopping = one_step(x, y, step, stop.requested)
            step += 1
            dt = timer.add(step, time.perf_counter() - t0)
            rec = {"step": step, "train_loss": last_loss, "ms_per_step": dt * 1e3,
                   "tokens_per_s": x.numel() / dt if dt > 0 else None} | one_step.stats()
            if on_step:
                on_step(rec)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = val_loss_of(model)
                rec = rec | {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}
                metrics(rec)
                history.append(rec)
                if on_eval:
                    on_eval(rec)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                if clock is not None and red is not None:
                    arbs_nn.check_ranks(model)  # never write a state the ranks disagree on
                save(step)
    if stopping and store.resolve_checkpoint(run_dir).name != store.step_dir(step):
        save(step)
    if val_loss is None:
        val_loss = val_loss_of(model)
    fused_loss = gap = None
    if formats.is_e1tm(cfg.format):
        fused_loss = val_loss_of(fused_model(store.open_checkpoint(run_dir), device=cfg.device) if rank0 else None)
        gap = fused_loss - val_loss
        metrics({"step": step, "val_loss_fused": fused_loss, "fuse_gap": gap})
    return TrainResult(
        run_dir=run_dir, steps=step, final_train_loss=last_loss, val_loss=val_loss, val_loss_fused=fused_loss,
        fuse_gap=gap, ms_per_step=timer.ms_per_step, interrupted=stopping, history=history,
    )


def _append_metrics(run_dir: Path, rec: dict) -> None:
    """metrics.jsonl is a log, not the run: if it cannot be written, warn and train on."""
    try:
        store.append_metrics(run_dir, rec)
    except ArbsError as e:
        log.warning("%s (step %s is not in metrics.jsonl; training goes on)", e, rec.get("step"))


class _Stepper:
    """One optimizer step: the fuse phase's start (E1TM), forward, backward, then votes or AdamW.

    With several micro-batch slots (``micro`` per rank x the world size) each of this rank's slots of the global
    batch runs forward and backward on its own; the step's votes (or float gradients) are then summed and
    applied once. One slot in one process is the plain step (and the CUDA graph)."""

    def __init__(self, cfg: TrainConfig, model, handles: dict, run_dir: Path, *, red=None, micro: int = 1):
        self.cfg, self.model, self.run_dir = cfg, model, run_dir
        self.opt, self.clock = handles.get("optimizer"), handles.get("clock")
        self.red, self.micro = red, micro
        self.world, self.rank = (1, 0) if red is None else (red.world, red.rank)
        self.slots = self.world * micro
        self.fuse_from = cfg.steps - round(cfg.resolved_fuse_phase * cfg.steps)
        self.use_graph = (cfg.cuda_graph and self.clock is not None and cfg.device == "cuda"
                          and self.slots == 1 and red is None and arbs_nn.graphable(model))
        self.graphed = None
        model.train()

    def __call__(self, x, y, step: int, stop: bool = False) -> tuple[float, bool]:
        """Train on the global batch (x, y) of ``step``: returns (mean training loss, whether to stop: some rank
        asked to)."""
        model, opt, clock = self.model, self.opt, self.clock
        if opt is not None:
            for g in opt.param_groups:
                g["lr"] = self.cfg.lr_at(step)
        elif step >= self.fuse_from and not clock.fuse_phase:  # idempotent, so a resumed run does the same
            st = arbs_nn.enter_fuse_phase_(model, grid=self.cfg.fuse_grid)
            log.info("fuse phase from step %d: scales fused into E%s (%d of %d groups changed, %d clipped)", step,
                     f" on a {self.cfg.fuse_grid}-weight grid" if self.cfg.fuse_grid else "",
                     st["changed"], st["groups"], st["clipped"])
        if self.slots == 1 and self.red is None:
            return self._plain(x, y, step), stop
        accumulate = clock is not None and self.cfg.micro_batch_votes == "accumulate"
        total = 0.0
        with arbs_nn.accumulate(model) if accumulate else contextlib.nullcontext():
            for m in range(self.micro):
                rows = distributed.slot_rows(x.shape[0], self.slots, distributed.slot_of(m, self.rank, self.world))
                with autocast(self.cfg.device):
                    _, loss = model(x[rows], y[rows])
                total += loss.item()
                # float gradients: the mean over the global batch; votes do not depend on the scale
                (loss / self.slots if opt is not None else loss).backward()
        if self.red is not None:  # every rank sees the same loss and stop request, so all stop together
            total, stops = self.red.sum_scalars([total, float(stop)], "the step's loss")
            stop = stops > 0
        lv = self._finite(total / self.slots, step)
        if opt is not None:
            if self.red is not None:
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                self.red.sum_floats(grads, "float gradients")
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            arbs_nn.step(model)
        return lv, stop

    def _plain(self, x, y, step: int) -> float:
        model, opt = self.model, self.opt
        if self.use_graph:  # forward + backward + votes replayed from one CUDA graph; a NaN raises in step
            if self.graphed is None:
                self.graphed = arbs_nn.GraphedStep(model, lambda a, b: model(a, b)[1], x, y)
            return self._finite(self.graphed(x, y).item(), step)
        with autocast(self.cfg.device):
            _, loss = model(x, y)
        lv = self._finite(loss.item(), step)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            arbs_nn.step(model)
        return lv

    def stats(self) -> dict:
        return dict(self.clock.stats) if self.clock is not None else {}

    def _finite(self, lv: float, step: int) -> float:
        if not math.isfinite(lv):
            raise NonFiniteError(
                f"training loss became {lv} at step {step}; stopped without saving. "
                f"The last good checkpoint in {self.run_dir} is unchanged."
            )
        return lv


class _Timer:
    """Mean step time, leaving out the first step of a run (it compiles kernels)."""

    def __init__(self):
        self.total, self.n = 0.0, 0

    def add(self, step: int, dt: float) -> float:
        if step > 1:
            self.total += dt
            self.n += 1
        return dt

    @property
    def ms_per_step(self) -> float:
        return self.total / self.n * 1e3 if self.n else float("nan")


def _corpus(cfg: TrainConfig, context: int, hf: dict | None, run_dir: Path):
    """The run's data: bytes, or for a Hugging Face model its token ids (tokenized with the run's
    tokenizer, cached in the run directory)."""
    corpus = data_mod.load_corpus(cfg.data) if cfg.data else data_mod.default_corpus()
    if hf is not None:
        corpus = run_corpus(hf, corpus, cache_dir=run_dir)
    unit = "tokens" if hf is not None else "bytes"
    for part, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) < context + 1:
            raise ConfigError(
                f"the {part} split has {len(arr)} {unit}, fewer than --context {context} + 1; "
                "use more data or a smaller --context"
            )
    return corpus


def _open_run(cfg: TrainConfig, meta: dict, run_dir: Path, world: int = 1,
              step: int | None = None) -> tuple[dict, store.Checkpoint | None, int]:
    """(meta, checkpoint to resume from or None, micro-batches per rank): a new run must not overwrite one; a
    resumed run keeps its identity, and the rule parameters not given are the run's own. A run with several
    micro-batch slots per step (world size x micro-batches) records their count; a resume keeps it (at another
    world size, by default, with the micro-batches that keep it). ``step``: a data-parallel rank other than 0
    opens the checkpoint rank 0 chose (-1: none), reading only."""
    if step is not None:
        ckpt = store.open_checkpoint(run_dir / store.step_dir(step)) if step >= 0 else None
    else:
        has_checkpoint = run_dir.is_dir() and bool(store.list_checkpoints(run_dir))
        ckpt = None
        if cfg.resume and has_checkpoint:
            ckpt = store.open_latest_for_resume(run_dir)  # the newest that verifies; a damaged newer one is moved aside
        elif has_checkpoint:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
        elif cfg.resume:
            log.warning("--resume: %s holds no committed checkpoint (stopped before its first save); "
                        "starting the run from step 0", run_dir)
    if ckpt is None:
        micro = cfg.micro_batches or 1
        _record_slots(meta, cfg, world * micro)
        return meta, None, micro
    run_slots = ckpt.meta.get("micro_batch_slots") or 1
    micro = cfg.micro_batches or max(1, run_slots // world)
    if world * micro != run_slots:
        fix = (f"pass --micro-batches {run_slots // world}" if run_slots % world == 0 else
               f"use a world size that divides {run_slots}")
        raise ConfigError(
            f"--resume {run_dir}: the run votes on {run_slots} micro-batch slot(s) per step (world size x "
            f"--micro-batches); here world size {world} x --micro-batches {micro} = {world * micro}. To continue it "
            f"bit for bit, {fix}")
    _record_slots(meta, cfg, run_slots)
    if ckpt.rule is not None and ckpt.rule == meta.get("rule"):
        meta["rule_params"] = dict(ckpt.rule_params) | cfg.given_rule_params()
    check_resume(ckpt, meta, run_dir)
    # the run's identity, but the rule_params asked for (equal to the run's but for RESUME_MAY_CHANGE)
    return ckpt.meta | {k: v for k, v in meta.items() if k not in IDENTITY_KEYS or k == "rule_params"}, ckpt, micro


def _record_slots(meta: dict, cfg: TrainConfig, slots: int) -> None:
    """A step of several micro-batch slots is part of the run's identity (one slot: nothing recorded)."""
    distributed.slot_rows(cfg.batch_size, slots, 0)  # ConfigError unless --batch-size splits into the slots
    if slots > 1:
        meta["micro_batch_slots"] = slots
        meta["micro_batch_votes"] = cfg.micro_batch_votes


def _warn_if_schedule_ended(clock, step: int, steps: int) -> None:
    if clock is None or step >= steps or "flip_accum" not in clock.scheme.arrays():
        return
    sp = clock.scheme.params
    if sp["gain"] and schedule.trit_vote_gain(sp, step) == 0:  # as in ops.vote: past the horizon no trit votes
        log.warning("the run's vote schedule ended at step %d (--horizon): its trits are final and only its "
                    "scales train until the fuse phase; pass --horizon N (> %d) to go on training the trits",
                    sp["horizon"], step)


class _StopFlag:
    requested = False


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers send before preemption


@contextlib.contextmanager
def _sigint_stops():
    """While inside, a first SIGINT or SIGTERM sets ``.requested`` (the loop finishes its step, saves and
    returns); a second one aborts at once (KeyboardInterrupt): a save in progress is atomic, so the run
    directory stays whole either way."""
    stop = _StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    old = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def on_signal(signum, frame):
        if stop.requested:  # a second signal: stop now
            restore()
            raise KeyboardInterrupt
        stop.requested = True
        log.warning("%s: finishing this step and saving a checkpoint (send it again to abort)",
                    signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        restore()
