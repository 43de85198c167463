"""llama.cpp runs arbs' GGUF exports with arbs' loss: per-byte log-probabilities and generation speed.

Not CI: needs ``pip install llama-cpp-python`` (builds llama.cpp from source, about 4 minutes on 2 cores)
and a trained byte model. For each GGUF type it exports the checkpoint (``arbs.export.export``), loads the
file in llama.cpp, checks that llama.cpp tokenizes bytes one to one, and evaluates the same validation
windows as ``arbs eval`` (``arbs.data.eval_batches``): mean nats/byte and the largest per-byte difference
of log p(next byte) against arbs' own model. Then it times greedy generation (tokens/s) in llama.cpp and
in ``arbs generate`` (which re-runs the whole window per byte, no KV cache).

    python benchmarks/llama_cpp_check.py runs/small-grid --out /tmp/gguf --types auto,tq1_0,q4_0,q8_0,bf16

``auto`` is the default export (per tensor the smallest exact type); a type that cannot hold some tensor
exactly falls back to q4_0 for it (``--type T,q4_0``), which the table says.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arbs import data as data_mod
from arbs.export import export
from arbs.training.build import run_corpus
from arbs.training.evaluate import generate, load_model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def windows(ckpt_path: str, batch_size: int, batches: int):
    model, ckpt = load_model(ckpt_path)
    src = ckpt.meta.get("data_path")
    corpus = run_corpus(ckpt.meta, data_mod.load_corpus(src) if src else data_mod.default_corpus())
    ctx = ckpt.meta["model"]["context"]
    xs, ys = [], []
    for x, y in data_mod.eval_batches(corpus.val, batch_size=batch_size, context=ctx, max_batches=batches):
        xs.append(x)
        ys.append(y)
    return model, ckpt, torch.cat(xs), torch.cat(ys), ctx


@torch.no_grad()
def arbs_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """log p(y) per position (n_windows, ctx) from arbs' model."""
    logits, _ = model(x)
    return torch.gather(F.log_softmax(logits.double(), -1), -1, y[..., None])[..., 0].numpy()


def llama_logprobs(llm, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    out = np.empty(tuple(x.shape))
    for i in range(x.shape[0]):
        llm.reset()
        llm.eval(x[i].tolist())
        lp = _log_softmax(np.asarray(llm.scores[: x.shape[1]]))
        out[i] = lp[np.arange(x.shape[1]), y[i].numpy()]
    return out


def time_llama(llm, prompt: bytes, n: int) -> tuple[float, bytes]:
    llm.reset()
    toks = list(prompt)
    t0 = time.perf_counter()
    got = []
    for tok in llm.generate(toks, temp=0.0, top_k=1, reset=True):
        got.append(tok)
        if len(got) == n:
            break
    dt = time.perf_counter() - t0
    return n / dt, bytes(got)


def time_arbs(path: str, prompt: bytes, n: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    out = b"".join(generate(path, prompt, max_bytes=n, temperature=0))
    return n / (time.perf_counter() - t0), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="a fused run (or step dir / e1tm file) of the built-in byte model")
    ap.add_argument("--out", required=True, help="directory for the GGUF files")
    ap.add_argument("--types", default="auto,tq1_0,tq2_0,q4_0,q8_0,bf16,f16,f32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--gen", type=int, default=64, help="bytes to generate for the timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp use its CPU extra buffer types (weight repacking, AMX). Off by default: on "
                         "this AMX_INT8 CPU with llama-cpp-python 0.3.36 they segfault on q4_0/q8_0 models, llama.cpp's "
                         "own quantization of the same bf16 file included")
    a = ap.parse_args(argv)
    import llama_cpp
    from llama_cpp import Llama

    if not a.extra_bufts:
        default_params = llama_cpp.llama_model_default_params

        def without_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = without_extra_bufts
        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, ckpt, x, y, ctx = windows(a.ckpt, a.batch_size, a.batches)
    ref = arbs_logprobs(model, x, y)
    ref_loss = -ref.mean()
    print(f"arbs eval: {ref_loss:.6f} nats/byte over {x.numel()} bytes ({x.shape[0]} windows of {ctx})", flush=True)
    prompt = b"def "
    arbs_tps, arbs_text = time_arbs(a.ckpt, prompt, a.gen)
    print(f"arbs generate: {arbs_tps:.1f} bytes/s ({a.gen} greedy bytes): {arbs_text[:40]!r}", flush=True)
    rows = []
    for t in a.types.split(","):
        path = out / f"model-{t}.gguf"
        qtype = None if t == "auto" else (t if t in ("bf16", "f16", "f32", "q8_0", "q4_0") else f"{t},q4_0")
        rep = export(a.ckpt, path, to="gguf", type=qtype, force=True)
        types = sorted({tt.dtype for tt in rep.tensors if len(tt.shape) == 2})
        llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                    n_threads=a.threads, verbose=False)
        # valid UTF-8 (llama.cpp replaces invalid sequences with U+FFFD before tokenizing): every ASCII byte
        # and multi-byte characters
        sample = bytes(range(128)) + "def f(x):\n  return ünïcode € 𝔘".encode()
        bytewise = llm.tokenize(sample, add_bos=False, special=False) == list(sample)
        lp = llama_logprobs(llm, x, y)
        loss = -lp.mean()
        tps, text = time_llama(llm, prompt, a.gen)
        row = {"type": t, "tensor_types": types, "exact": rep.exact, "file_bytes": rep.file_bytes,
               "bpw_file": rep.bpw_file, "bytewise_tokens": bytewise, "llama_nats_per_byte": loss,
               "arbs_nats_per_byte": ref_loss, "diff": loss - ref_loss,
               "max_abs_logprob_diff": float(np.abs(lp - ref).max()), "llama_tok_s": tps, "arbs_tok_s": arbs_tps,
               "same_greedy_text": text == arbs_text}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    print()
    print("| type | tensor types | exact | file | bits/weight | llama.cpp nats/byte | diff vs arbs | max |Δ log p| |"
          " llama.cpp tok/s | arbs tok/s | same greedy text |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {'+'.join(r['tensor_types'])} | {'yes' if r['exact'] else 'no'} | "
              f"{r['file_bytes'] / 1e6:.2f} MB | {r['bpw_file']:.2f} | {r['llama_nats_per_byte']:.6f} | "
              f"{r['diff']:+.2e} | {r['max_abs_logprob_diff']:.1e} | {r['llama_tok_s']:.0f} | {r['arbs_tok_s']:.0f} | "
              f"{'yes' if r['same_greedy_text'] else 'no'} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["exact"] and (abs(r["diff"]) > 1e-3 or not r["bytewise_tokens"])]
    return 1 if bad or not all(math.isfinite(r["llama_nats_per_byte"]) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
