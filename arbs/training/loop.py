"""The one training loop: model + integer votes (E1TM) or an optimizer (float baselines) + data -> steps,
evaluations and checkpoints, with callbacks for progress. It draws nothing: the CLI plots the metrics.

Data order and every random choice derive from (seed, step), so a resumed run is bit-identical to an
uninterrupted one.
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
from .. import formats, schedule, store
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
    with store.run_lock(run_dir):  # one writer per run: a second one fails at once, naming this process
        return _train(cfg, run_dir, on_step, on_eval)


def _train(cfg: TrainConfig, run_dir: Path, on_step, on_eval) -> TrainResult:
    hf = hf_run_record(cfg.model, context=cfg.context, run_dir=run_dir, resume=cfg.resume) if cfg.model else None
    context = hf["model"]["context"] if hf else cfg.model_config().context
    corpus = _corpus(cfg, context, hf, run_dir)
    meta, ckpt = _open_run(cfg, run_meta(cfg, corpus.info, hf), run_dir)
    model, handles = build(meta, ckpt, device=cfg.device)
    step = ckpt.step_counter if ckpt is not None else 0

    def save(step: int) -> None:
        store.save_checkpoint(run_dir, to_checkpoint(model, handles, meta, step), keep=cfg.keep)

    def val_loss_of(m) -> float:
        return evaluate(m, corpus.val, batch_size=cfg.batch_size, context=context,
                        max_batches=cfg.eval_batches, device=cfg.device)

    if ckpt is None:
        save(0)
    _warn_if_schedule_ended(handles.get("clock"), step, cfg.steps)
    one_step = _Stepper(cfg, model, handles, run_dir)
    history, last_loss, val_loss, timer = [], float("nan"), None, _Timer()
    with _sigint_stops() as stop:
        while step < cfg.steps and not stop.requested:
            x, y = data_mod.get_batch(corpus.train, batch_size=cfg.batch_size, context=context, seed=cfg.seed, step=step)
            x, y = x.to(cfg.device), y.to(cfg.device)
            t0 = time.perf_counter()
            last_loss = one_step(x, y, step)
            step += 1
            dt = timer.add(step, time.perf_counter() - t0)
            rec = {"step": step, "train_loss": last_loss, "ms_per_step": dt * 1e3,
                   "tokens_per_s": x.numel() / dt if dt > 0 else None} | one_step.stats()
            if on_step:
                on_step(rec)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = val_loss_of(model)
                rec = rec | {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}
                _append_metrics(run_dir, rec)
                history.append(rec)
                if on_eval:
                    on_eval(rec)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                save(step)
    if stop.requested and store.resolve_checkpoint(run_dir).name != store.step_dir(step):
        save(step)
    if val_loss is None:
        val_loss = val_loss_of(model)
    fused_loss = gap = None
    if formats.is_e1tm(cfg.format):
        fused_loss = val_loss_of(fused_model(store.open_checkpoint(run_dir), device=cfg.device))
        gap = fused_loss - val_loss
        _append_metrics(run_dir, {"step": step, "val_loss_fused": fused_loss, "fuse_gap": gap})
    return TrainResult(
        run_dir=run_dir, steps=step, final_train_loss=last_loss, val_loss=val_loss, val_loss_fused=fused_loss,
        fuse_gap=gap, ms_per_step=timer.ms_per_step, interrupted=stop.requested, history=history,
    )


def _append_metrics(run_dir: Path, rec: dict) -> None:
    """metrics.jsonl is a log, not the run: if it cannot be written, warn and train on."""
    try:
        store.append_metrics(run_dir, rec)
    except ArbsError as e:
        log.warning("%s (step %s is not in metrics.jsonl; training goes on)", e, rec.get("step"))


class _Stepper:
    """One optimizer step: the fuse phase's start (E1TM), forward, backward, then votes or AdamW."""

    def __init__(self, cfg: TrainConfig, model, handles: dict, run_dir: Path):
        self.cfg, self.model, self.run_dir = cfg, model, run_dir
        self.opt, self.clock = handles.get("optimizer"), handles.get("clock")
        self.fuse_from = cfg.steps - round(cfg.resolved_fuse_phase * cfg.steps)
        self.use_graph = (cfg.cuda_graph and self.clock is not None and cfg.device == "cuda"
                          and arbs_nn.graphable(model))
        self.graphed = None
        model.train()

    def __call__(self, x, y, step: int) -> float:
        model, opt, clock = self.model, self.opt, self.clock
        if opt is not None:
            for g in opt.param_groups:
                g["lr"] = self.cfg.lr_at(step)
        elif step >= self.fuse_from and not clock.fuse_phase:  # idempotent, so a resumed run does the same
            st = arbs_nn.enter_fuse_phase_(model)
            log.info("fuse phase from step %d: scales fused into E (%d of %d groups changed, %d clipped)",
                     step, st["changed"], st["groups"], st["clipped"])
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


def _open_run(cfg: TrainConfig, meta: dict, run_dir: Path) -> tuple[dict, store.Checkpoint | None]:
    """(meta, checkpoint to resume from or None): a new run must not overwrite one; a resumed run keeps
    its identity, and the rule parameters not given are the run's own."""
    has_checkpoint = run_dir.is_dir() and bool(store.list_checkpoints(run_dir))
    if not cfg.resume or not has_checkpoint:
        if has_checkpoint:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
        if cfg.resume:
            log.warning("--resume: %s holds no committed checkpoint (stopped before its first save); "
                        "starting the run from step 0", run_dir)
        return meta, None
    ckpt = store.open_latest_for_resume(run_dir)  # the newest that verifies; a damaged newer one is moved aside
    if ckpt.rule is not None and ckpt.rule == meta.get("rule"):
        meta["rule_params"] = dict(ckpt.rule_params) | cfg.given_rule_params()
    check_resume(ckpt, meta, run_dir)
    # the run's identity, but the rule_params asked for (equal to the run's but for RESUME_MAY_CHANGE)
    return ckpt.meta | {k: v for k, v in meta.items() if k not in IDENTITY_KEYS or k == "rule_params"}, ckpt


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
