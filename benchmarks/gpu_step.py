"""Training-step time and peak GPU memory: dense bf16 + AdamW vs BitNet STE vs E1TM32 (arbs.nn), on one GPU.

    python benchmarks/gpu_step.py                 # the table for docs/gpu.md (85M, 1.2B, 6.4B)
    python benchmarks/gpu_step.py --search        # + the largest model dense / E1TM32 carry train at 1x512
    python benchmarks/gpu_step.py --smoke --device cpu   # tiny shapes, checks the script runs (no GPU)

Model: a plain GPT: byte vocab (256), untied head, per block qkv d->3d, proj d->d, mlp d->4d->d (GELU),
causal F.scaled_dot_product_attention, RMSNorm without weights; every run is under bf16 autocast.

- dense: float32 master weights, bf16 autocast, torch.optim.AdamW(fused=True).
- bitnet: float32 latent weights in the blocks' Linear layers, absmean ternary fake-quant per tensor
  with a straight-through estimator (BitNet b1.58 style; embedding and head stay float), AdamW(fused).
- e1tm-<rule>: arbs.nn.ternarize_(model, "E1TM32", rule) on every Linear and the Embedding, state on the
  GPU; forward/backward/vote exactly as arbs.nn does them, then arbs.nn.step(model).
  W_eff is materialized in bf16, the bf16 weight gradient is voted as is, and the step syncs once.
- e1tm-<rule>+graph: the same step captured once in a CUDA graph and replayed (arbs.nn.GraphedStep, what
  `arbs train --device cuda` does for carry and flip).

The initial E1TM state of every layer comes from ops.convert of a random normal weight; to keep setup in
seconds (ops.convert runs on the CPU at ~150 ns/weight), each distinct weight shape is converted once,
for at most 256 rows, and tiled over all rows and layers of that shape. This changes nothing a step
costs. Timing: warm-up steps, then the median of timed steps, each ended by torch.cuda.synchronize();
peak = torch.cuda.max_memory_allocated() over the timed steps (state, optimizer, activations, transients).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import arbs.nn as anm
from arbs import ops

GiB = 1024**3


# -- model -----------------------------------------------------------------------------------------
def rms_norm(x):
    return F.rms_norm(x.float(), (x.shape[-1],)).type_as(x)


class BitLinear(nn.Linear):
    """BitNet b1.58 weight fake-quant: W_q = clamp(round(W/s), -1, 1)*s, s = mean|W|; STE gradient."""

    def forward(self, x):
        w = self.weight
        s = w.abs().mean().clamp(min=1e-5)
        wq = (w / s).round().clamp(-1, 1) * s
        return F.linear(x, w + (wq - w).detach())


class Block(nn.Module):
    def __init__(self, d, head_dim, linear=nn.Linear):
        super().__init__()
        self.n_head = d // head_dim
        self.qkv = linear(d, 3 * d, bias=False)
        self.proj = linear(d, d, bias=False)
        self.fc1 = linear(d, 4 * d, bias=False)
        self.fc2 = linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(rms_norm(x)).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(rms_norm(x))))


class GPT(nn.Module):
    def __init__(self, layers, d, linear=nn.Linear):
        super().__init__()
        head_dim = 64 if d <= 1024 else 128
        self.emb = nn.Embedding(256, d)
        self.blocks = nn.ModuleList([Block(d, head_dim, linear) for _ in range(layers)])
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        logits = self.head(rms_norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def n_weights(layers, d):
    return 12 * layers * d * d + 2 * 256 * d


# -- E1TM setup ------------------------------------------------------------------------------------
@contextlib.contextmanager
def fast_convert(max_rows=256, seed=0):
    """ops.convert memoized per (shape, scheme): random normal weight, <= max_rows rows, tiled."""
    real, cache, rng = ops.convert, {}, np.random.default_rng(seed)

    def convert(w, scheme, *, name="tensor"):
        key = (tuple(w.shape), scheme.format, scheme.rule, tuple(sorted(scheme.params.items())))
        if key not in cache:
            rows, cols = w.shape[0], math.prod(w.shape[1:])
            r = min(rows, max_rows)
            w0 = (rng.standard_normal((r, cols)) / math.sqrt(cols)).astype(np.float32)
            st, stats = real(w0, scheme, name=name)
            reps = -(-rows // r)
            cache[key] = ({k: np.ascontiguousarray(np.tile(v, (reps, 1))[:rows]) for k, v in st.items()}, stats)
        return cache[key]

    ops.convert = convert
    try:
        yield
    finally:
        ops.convert = real


def e1tm_model(layers, d, rule, device):
    """GPT with every Linear and the Embedding in E1TM32 form, built without allocating float weights."""
    with torch.device("meta"):
        model = GPT(layers, d)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            shape = tuple(m.weight.shape)
            del m.weight  # a zero-stride stand-in: ternarize_ reads only its shape through fast_convert
            m.weight = torch.zeros((), dtype=torch.float32).expand(shape)
    with fast_convert():
        model = anm.ternarize_(model, "E1TM32", rule)
    return model.to(device), anm.model_clock(model)


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    params: int
    batch: str
    method: str
    ms: float | None = None
    tok_s: float | None = None
    peak_gib: float | None = None
    note: str = ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, warmup, iters, tokens, reset_peak=True):
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda" and reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")
    return ms, tokens / (ms / 1e3), peak


def run_row(method, layers, d, batch, ctx, device, warmup, iters, amp_on=True):
    """Build the model for ``method``, time it, free everything. Returns (ms, tok/s, peak GiB)."""
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, 256, (batch, ctx + 1), device=device, generator=gen)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if amp_on else contextlib.nullcontext()
    if method in ("dense", "bitnet"):
        with torch.device(device):
            model = GPT(layers, d, BitLinear if method == "bitnet" else nn.Linear)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with amp:
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return measure(step, device, warmup, iters, batch * ctx)
    rule, _, graph = method.removeprefix("e1tm-").partition("+")
    model, clock = e1tm_model(layers, d, rule, device)
    if graph:  # peak counted from before the capture: a graph's pool is allocated then, not at replay
        torch.cuda.reset_peak_memory_stats(device)
        graphed = anm.GraphedStep(model, model, x, y)
        return measure(lambda: graphed(x, y), device, warmup, iters, batch * ctx, reset_peak=False)

    def step():
        with amp:
            loss = model(x, y)
        loss.backward()  # votes happen here, layer by layer, with no sync
        anm.step(model)  # one sync: the step's vote counts

    return measure(step, device, warmup, iters, batch * ctx)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_row(method, layers, d, batch, ctx, device, warmup, iters, amp_on=True) -> tuple:
    try:
        return run_row(method, layers, d, batch, ctx, device, warmup, iters, amp_on), ""
    except torch.OutOfMemoryError:
        return None, "OOM"
    except Exception as e:  # report and go on with the next row
        import traceback

        traceback.print_exc()
        return None, f"ERR {type(e).__name__}"
    finally:
        free(device)


# -- kernel breakdown (evidence for the arbs.nn GPU path) -------------------------------------------


def kernel_bandwidth(device, shapes=((16384, 4096), (4096, 4096), (3072, 768))):
    """Each kernel alone on one E1TM32 weight (triton.testing.do_bench, median): ms and GB/s, counting
    the fewest bytes it must move (each input read once, each output written once)."""
    import triton

    from arbs import formats
    from arbs.kernels import triton_gpu as tg

    res = []
    gs = 32
    for rows, cols in shapes:
        n, ng, nb = rows * cols, rows * cols // gs, formats.packed_cols(cols) * rows
        g = torch.Generator(device=device).manual_seed(1)
        tp = torch.randint(0, 243, (rows, formats.packed_cols(cols)), dtype=torch.uint8, device=device, generator=g)
        E = torch.randint(-20, 20, (rows, cols // gs), dtype=torch.int8, device=device, generator=g)
        corr = torch.randint(-511, 512, (rows, cols // gs), dtype=torch.int64, device=device, generator=g)
        fa = torch.zeros((rows, cols), dtype=torch.int8, device=device)
        grad = torch.randn((rows, cols), device=device, generator=g)
        gradb = grad.to(torch.bfloat16)
        delta = torch.empty_like(corr)
        cnt = tg.new_counters(device)
        ob, of = torch.empty((rows, cols), dtype=torch.bfloat16, device=device), torch.empty((rows, cols), device=device)
        cases = {
            "copy bf16 (yardstick)": (lambda: ob.copy_(gradb), 4 * n),
            "materialize -> bf16": (lambda: tg.launch_materialize(tp, E, corr, gs, 1, 16 * gs, ob), 2 * n + nb + 9 * ng),
            "materialize -> fp32": (lambda: tg.launch_materialize(tp, E, corr, gs, 1, 16 * gs, of), 4 * n + nb + 9 * ng),
            "vote_delta fp32 grad": (lambda: tg.launch_vote(grad, tp, gs, delta, cnt), 4 * n + nb + 8 * ng),
            "vote_delta bf16 grad": (lambda: tg.launch_vote(gradb, tp, gs, delta, cnt), 2 * n + nb + 8 * ng),
            "apply_votes (carry)": (lambda: tg.launch_apply(corr, E, delta, 16 * gs, cnt, True), 26 * ng),
            "flip fp32 grad": (lambda: tg.launch_flip(grad, tp, fa, 8, cnt, True), 4 * n + 2 * n + 2 * nb),
        }
        for name, (fn, nbytes) in cases.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            res.append({"shape": f"{rows}x{cols}", "kernel": name, "ms": ms, "GBps": nbytes / ms / 1e6})
        del tp, E, corr, fa, grad, gradb, delta, ob, of
        free(device)
    return res




# -- main ------------------------------------------------------------------------------------------
CONFIGS = [(12, 768, 16, 512), (24, 2048, 4, 512), (32, 4096, 1, 512)]
METHODS = ["dense", "bitnet", "e1tm-average", "e1tm-carry", "e1tm-flip", "e1tm-carry+graph", "e1tm-flip+graph"]


def fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def print_table(rows, title):
    print(f"\n{title}")
    hdr = f"| {'layers x width':>14} | {'params':>7} | {'batch':>6} | {'method':<16} | {'ms/step':>8} | {'tok/s':>9} | {'peak GiB':>8} | {'time/dense':>10} | {'mem/dense':>9} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    dense = {(r.model, r.batch): r for r in rows if r.method == "dense" and r.ms}
    for r in rows:
        base = dense.get((r.model, r.batch))
        if r.ms is None:
            print(f"| {r.model:>14} | {fmt_params(r.params):>7} | {r.batch:>6} | {r.method:<16} | {r.note:>8} | {'':>9} | {'':>8} | {'':>10} | {'':>9} |")
            continue
        tr = f"{r.ms / base.ms:.2f}x" if base else "n/a"
        mr = f"{r.peak_gib / base.peak_gib:.3f}x" if base else "n/a"
        print(f"| {r.model:>14} | {fmt_params(r.params):>7} | {r.batch:>6} | {r.method:<16} | {r.ms:8.1f} | {r.tok_s:9.0f} | {r.peak_gib:8.2f} | {tr:>10} | {mr:>9} |")


def device_info(device):
    if device.type != "cuda":
        return {"device": "cpu"}
    p = torch.cuda.get_device_properties(device)
    import triton

    return {"device": p.name, "memory_GiB": round(p.total_memory / GiB, 1), "sms": p.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--search", action="store_true", help="also search the largest trainable model at 1x512")
    ap.add_argument("--search-widths", default="8192,12288,16384,18432", help="E1TM widths tried at depth 32")
    ap.add_argument("--dense-widths", default="3072,3584,4096,4608", help="dense widths tried at depth 32")
    ap.add_argument("--no-table", action="store_true", help="skip the main table")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    ap.add_argument("--no-amp", action="store_true", help="float32, no autocast")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kernels", action="store_true", help="also time each kernel alone (GB/s)")
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "gpu_step.json") if os.environ.get("OUT") else None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    methods = a.methods.split(",")
    configs = [(2, 64, 2, 32), (2, 128, 1, 32)] if a.smoke else CONFIGS
    info = device_info(device)
    print(json.dumps(info), flush=True)
    result = {"device": info, "argv": sys.argv, "rows": [], "search": []}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)

    if a.kernels and device.type == "cuda":
        result["kernels"] = kernel_bandwidth(device)
        save()
        print("\nkernels alone (E1TM32, do_bench median):")
        for k in result["kernels"]:
            print(f"  {k['shape']:>10} {k['kernel']:<22} {k['ms']:8.3f} ms {k['GBps']:7.0f} GB/s")
    rows = []
    if not a.no_table:
        for layers, d, b, ctx in configs:
            for method in methods:
                if method.endswith("+graph") and device.type != "cuda":
                    continue
                t0 = time.perf_counter()
                res, note = try_row(method, layers, d, b, ctx, device, a.warmup, a.iters, not a.no_amp)
                r = Row(f"{layers}x{d}", n_weights(layers, d), f"{b}x{ctx}", method, *(res or (None, None, None)), note)
                rows.append(r)
                result["rows"].append(asdict(r))
                save()
                print(f"  {r.model} {r.method}: {r.ms if r.ms is None else round(r.ms, 1)} ms, "
                      f"peak {r.peak_gib if r.peak_gib is None else round(r.peak_gib, 2)} GiB {note} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    search = []
    if a.search:
        L = 2 if a.smoke else 32
        widths = [256, 512] if a.smoke else [int(w) for w in a.search_widths.split(",")]
        dense_ws = [96, 128] if a.smoke else [int(w) for w in a.dense_widths.split(",")]
        plan = [("dense", dense_ws), ("e1tm-carry", widths)]
        for method, ws in plan:
            for d in ws:
                t0 = time.perf_counter()
                ctx = 32 if a.smoke else 512
                res, note = try_row(method, L, d, 1, ctx, device, 1, 3, not a.no_amp)
                r = Row(f"{L}x{d}", n_weights(L, d), f"1x{ctx}", method, *(res or (None, None, None)), note)
                search.append(r)
                result["search"].append(asdict(r))
                save()
                print(f"  search {r.model} {method}: {note or f'{r.ms:.0f} ms, {r.peak_gib:.1f} GiB'} ({time.perf_counter() - t0:.0f} s)", flush=True)
                if res is None:
                    break
    if rows:
        print_table(rows, f"Training step on {info['device']} (median of {a.iters} steps after {a.warmup} warm-up; "
                          f"{'float32' if a.no_amp else 'bf16 autocast'})")
    if search:
        print_table(search, "Largest model at batch 1x512, depth 32 (1 warm-up, median of 3 steps; a search stops at its first OOM)")


if __name__ == "__main__":
    main()
