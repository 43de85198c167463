"""Validation loss and sampling: ``evaluate`` (used by the loop), ``arbs eval`` and ``arbs generate`` on any
arbs checkpoint: E1TM training, fused, or float baseline."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import data as data_mod
from .. import store
from ..errors import ConfigError
from .build import autocast, build, fused_model

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, val: np.ndarray, *, batch_size: int, context: int, max_batches: int, device="cpu") -> float:
    """Mean validation loss in nats/byte over fixed, evenly spaced windows."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in data_mod.eval_batches(val, batch_size=batch_size, context=context, max_batches=max_batches):
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss) * x.numel()
        n += x.numel()
    model.train(was)
    return total / max(n, 1)


def load_model(path, device: str = "cpu") -> tuple[torch.nn.Module, store.Checkpoint]:
    """The model of a checkpoint (run dir or step dir) in eval mode. Fused checkpoints get S = 2**E_fused."""
    ckpt = store.open_checkpoint(path)
    if "model" not in ckpt.meta:
        raise ConfigError(
            f"{ckpt.path} holds no model config (it was made by 'arbs convert' from a foreign model); "
            "eval/generate work on checkpoints of the built-in model made by 'arbs train'"
        )
    if ckpt.kind == "e1tm" and ckpt.fused:
        model = fused_model(ckpt, device=device)
    else:
        model, _ = build(ckpt.meta, ckpt, device=device)
    return model.eval(), ckpt


@dataclass(frozen=True)
class EvalResult:
    path: str
    kind: str
    fused: bool
    step: int | None
    val_loss: float  # nats/byte
    val_bytes: int

    @property
    def val_bpb(self) -> float:
        return self.val_loss / math.log(2)


def eval_checkpoint(path, *, data: str | None = None, batch_size: int = 16, max_batches: int = 8,
                    device: str = "cpu") -> EvalResult:
    """Validation loss of a checkpoint on its run's validation split (or ``data``'s)."""
    model, ckpt = load_model(path, device)
    src = data if data is not None else ckpt.meta.get("data_path")
    corpus = data_mod.load_corpus(src) if src else data_mod.default_corpus()
    want = ckpt.meta.get("data", {}).get("sha256")
    if data is None and want and corpus.info.get("sha256") != want:
        log.warning("the data differ from the run's (sha256 %s, run had %s): losses are not comparable",
                    corpus.info.get("sha256"), want)
    context = ckpt.meta["model"]["context"]
    loss = evaluate(model, corpus.val, batch_size=batch_size, context=context, max_batches=max_batches, device=device)
    return EvalResult(str(ckpt.path), ckpt.kind, ckpt.fused, ckpt.step_counter, loss,
                      min(len(corpus.val), batch_size * max_batches * context))


def generate(path, prompt: str, *, max_bytes: int = 200, temperature: float = 0.8, seed: int = 0,
             device: str = "cpu") -> bytes:
    """Sample ``max_bytes`` bytes after ``prompt`` (UTF-8) from a checkpoint's model."""
    if max_bytes < 0:
        raise ConfigError(f"--max-bytes must be >= 0, got {max_bytes}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    model, _ = load_model(path, device)
    raw = prompt.encode("utf-8") or b"\n"
    idx = torch.tensor([list(raw)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(idx, max_bytes, temperature=temperature, generator=g)
    return bytes(out[0, len(raw):].tolist())
