"""Validation loss and sampling: ``evaluate`` (used by the loop), ``arbs eval`` and ``arbs generate`` on any
arbs checkpoint: E1TM training, fused, or float baseline. A run of a Hugging Face model reads and writes
text through the tokenizer it recorded: its losses are per token, its samples tokens decoded to text."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .. import data as data_mod
from .. import store
from ..errors import ConfigError
from ..models import hf
from .build import autocast, build, fused_model, run_corpus

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, val: np.ndarray, *, batch_size: int, context: int, max_batches: int, device="cpu") -> float:
    """Mean validation loss in nats per byte (per token for token ids) over fixed, evenly spaced windows."""
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
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")
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
    val_loss: float  # nats/byte (nats/token for a Hugging Face run: unit)
    val_bytes: int  # bytes evaluated (tokens for a Hugging Face run)
    unit: str = "byte"  # "token" for a Hugging Face run

    @property
    def val_bpb(self) -> float:
        return self.val_loss / math.log(2)


def eval_checkpoint(path, *, data: str | None = None, batch_size: int = 16, max_batches: int = 8,
                    device: str = "cpu") -> EvalResult:
    """Validation loss of a checkpoint on its run's validation split (or ``data``'s)."""
    model, ckpt = load_model(path, device)
    src = data if data is not None else ckpt.meta.get("data_path")
    corpus = run_corpus(ckpt.meta, data_mod.load_corpus(src) if src else data_mod.default_corpus())
    want = ckpt.meta.get("data", {}).get("sha256")
    if data is None and want and corpus.info.get("sha256") != want:
        log.warning("the data differ from the run's (sha256 %s, run had %s): losses are not comparable",
                    corpus.info.get("sha256"), want)
    context = ckpt.meta["model"]["context"]
    loss = evaluate(model, corpus.val, batch_size=batch_size, context=context, max_batches=max_batches, device=device)
    return EvalResult(str(ckpt.path), ckpt.kind, ckpt.fused, ckpt.step_counter, loss,
                      min(len(corpus.val), batch_size * max_batches * context),
                      "token" if hf.is_hf_meta(ckpt.meta) else "byte")


MAX_GENERATE_BYTES = 1 << 20  # each byte is one forward pass: a cap that a typo cannot turn into days


def generate(path, prompt: str | bytes, *, max_bytes: int = 200, temperature: float = 0.8, seed: int = 0,
             device: str = "cpu") -> Iterator[bytes]:
    """Sample up to ``max_bytes`` bytes after ``prompt`` from a checkpoint's model, yielding each byte
    as it is sampled. ``prompt`` is bytes, or a str encoded as UTF-8 (lone surrogates from undecodable
    command-line bytes become those bytes again). Arguments are checked before the model is loaded.

    A Hugging Face run samples up to ``max_bytes`` *tokens*: the prompt is encoded with the run's tokenizer
    (no special tokens added, as in training) and the tokens are decoded as they come, yielding the UTF-8
    bytes of each decoded piece (a character split across tokens comes when it is whole; one still
    incomplete when the sample ends comes as its bytes, U+FFFD for each that is not UTF-8)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 <= max_bytes <= MAX_GENERATE_BYTES:
        raise ConfigError(f"--max-bytes must be an integer 0 .. {MAX_GENERATE_BYTES}, got {max_bytes!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ConfigError(f"--seed must be an integer 0 .. 2**63-1, got {seed!r}")
    raw = prompt if isinstance(prompt, bytes) else prompt.encode("utf-8", "surrogateescape")
    model, ckpt = load_model(path, device)
    g = torch.Generator(device=device).manual_seed(seed)
    if hf.is_hf_meta(ckpt.meta):
        return _generate_text(model, ckpt.meta, raw, max_bytes, temperature, g, device)
    idx = torch.tensor([list(raw or b"\n")], dtype=torch.long, device=device)
    return (bytes([int(nxt[0, 0])]) for nxt in model.stream(idx, max_bytes, temperature=temperature, generator=g))


def _generate_text(model, meta: dict, raw: bytes, max_tokens: int, temperature: float, g, device: str):
    """Tokens sampled after the encoded prompt, decoded incrementally (tokenizers' DecodeStream). The
    tokenizer and prompt are read now; the returned iterator samples."""
    from tokenizers.decoders import DecodeStream

    tok = hf.load_tokenizer(hf.tokenizer_bytes(meta.get("hf")))
    text = raw.decode("utf-8", "replace")
    ids = tok.encode(text or "\n", add_special_tokens=False).ids or tok.encode("\n", add_special_tokens=False).ids
    if not ids:
        raise ConfigError("the tokenizer encodes neither the prompt nor a newline to any token; give a --prompt")
    ids = ids[-model.context:]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    decoder = DecodeStream(ids=ids, skip_special_tokens=False)

    def pieces():
        pending = []  # tokens the stream holds back: the start of a character not yet complete
        for nxt in model.stream(idx, max_tokens, temperature=temperature, generator=g):
            t = int(nxt[0, 0])
            piece = decoder.step(tok, t)
            pending = [] if piece else pending + [t]
            if piece:
                yield piece.encode("utf-8")
        if pending:  # the sample ended inside a character: show its bytes (U+FFFD where not UTF-8), not nothing
            tail = tok.decode(pending, skip_special_tokens=False)
            if tail:
                yield tail.encode("utf-8")

    return pieces()
