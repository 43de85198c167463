"""Flip-rule experiments (prototype; not part of the product until benchmarks/learning.py earns it).

A torch re-statement of the integer carry/flip update on unpacked state, fast enough on a GPU to sweep
vote variants on the ``tiny`` preset. Each step the float W_eff = 2**(E + corr_accum/(K*gs)) * T is
written into the float model's weights, standard autograd gives the weight gradient, and the integer
update below consumes it. Persistent state is the same integers as the product's flip rule.

Vote variants for the trit counters (``--vote``):

- ``sign``: r = -sign(g) (the product's flip rule).
- ``stoch``: r = -sign(g) with probability min(1, lr(t) * |g| / (tau * rms(g))), rms over the tensor:
  small gradients rarely vote, so unimportant weights stop random-walking.

    python experiments/flip_lab.py --steps 1000 --vote stoch --tau 1.0 --sched cos --out runs/lab/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from arbs import data as data_mod
from arbs import formats
from arbs import ops
from arbs.models.gpt import GPT, get_preset




def lr_mult(sched: str, step: int, steps: int, floor: float = 0.1, warmup: int = 50) -> float:
    """Warmup + cosine to ``floor`` ("cos") or to 0 ("cos0"); 1 for "const"."""
    if sched == "const":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    floor = 0.0 if sched == "cos0" else floor
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


class IntWeight:
    """Unpacked integer state of one weight: T (rows, cols_p) int8, E/corr (rows, ng), fa (rows, cols_p)."""

    def __init__(self, w: np.ndarray, scheme: formats.Scheme, device):
        state, _ = ops.convert(w, scheme)
        self.shape = w.shape
        self.rows, self.cols = formats.tensor_view(w.shape)
        self.gs = scheme.gs
        self.cols_p = formats.n_groups(self.cols, self.gs) * self.gs
        T = ops.unpack(state["T_packed"], self.cols_p)
        self.T = torch.from_numpy(T).to(device)
        self.E = torch.from_numpy(state["E"].astype(np.int64)).to(device)
        self.corr = torch.from_numpy(state["corr_accum"]).to(device)
        self.fa = torch.zeros((self.rows, self.cols_p), dtype=torch.int64, device=device)
        self.L = scheme.params["K"] * self.gs
        self.ls = None  # --svote adam: float log2-scales (not the product; a ceiling for integer scale votes)

    def float_scales(self) -> torch.Tensor:
        self.ls = (self.E.double() + self.corr.double() / self.L).detach().requires_grad_(True)
        return self.ls

    def scale(self, rounded=False) -> torch.Tensor:
        x = self.ls if self.ls is not None else self.E.double() + self.corr.double() / self.L
        if rounded:
            x = torch.round(x)
        return torch.exp2(x).float()

    def w_eff(self, rounded=False) -> torch.Tensor:
        S = self.scale(rounded).repeat_interleave(self.gs, dim=1)
        return (S * self.T.float())[:, : self.cols].reshape(self.shape)

    def snap(self) -> None:
        self.E = torch.round(self.E.double() + self.corr.double() / self.L).long().clamp(-128, 127)
        self.corr.zero_()

    def update(self, g: torch.Tensor, a, step: int, gen) -> int:
        g2 = torch.zeros((self.rows, self.cols_p), dtype=torch.float32, device=g.device)
        g2[:, : self.cols] = g.reshape(self.rows, self.cols)
        sg = torch.sign(g2).long()
        T = self.T.long()
        m = lr_mult(a.sched, step, a.steps, a.floor)

        def per_group(x):  # (rows, cols_p) -> (rows, groups): the sum over each group
            return x.view(self.rows, -1, self.gs).sum(-1)
        # scale votes (carry rule)
        if a.snap and step >= a.fuse_from:
            delta = None  # snapped: scales frozen at their fused value
        elif a.svote == "adam":  # float ceiling: log2-scales as float parameters, Adam on dL/dlog2(S)
            W = self.scale().repeat_interleave(self.gs, dim=1) * T.float()
            self.ls.grad = per_group(g2 * W).double() * math.log(2)
            delta = None
        elif a.svote == "sign":
            delta = -per_group(sg * T)
        elif a.svote in ("signm", "gsign"):  # scheduled sign votes: k = stochastic rounding of m*sstep per group
            p = torch.full((self.rows, self.corr.shape[1]), m * a.sstep, device=g2.device)
            if a.sdet:  # the same k for every group: round(m*sstep), no randomness
                k = torch.round(p).long()
            else:
                k = (p.floor() + (torch.rand(p.shape, device=p.device, generator=gen) < p - p.floor()).float()).long()
            if a.svote == "signm":  # the carry vote (sum of per-weight signs), times k
                delta = -per_group(sg * T) * k
            else:  # one sign per group: the sign of the group's dL/dS = sum g*T, times k
                delta = -torch.sign(per_group(g2 * T.float())).long() * k
        else:  # stochastic rounding of the group's gradient dL/dS (sum g*T), normalized per row
            Gs = per_group(g2 * T.float())
            s = Gs.square().mean(dim=1, keepdim=True).sqrt()
            p = (m * Gs.abs() / (a.taus * s + 1e-30)).clamp(max=float(a.sclamp * self.gs))
            k = p.floor() + (torch.rand(p.shape, device=p.device, generator=gen) < p - p.floor()).float()
            delta = -torch.sign(Gs).long() * k.long()
        if delta is not None:
            self.corr += delta
        up, dn = self.corr >= self.L, self.corr <= -self.L
        self.E += up.long() - dn.long()
        self.corr -= self.L * up.long() - self.L * dn.long()
        if a.carry:  # the carry rule: trits frozen
            return 0
        # trit votes
        if a.vote == "sign":
            r = -sg
            if a.sched != "const":
                r = r * (torch.rand(g2.shape, device=g2.device, generator=gen) < m).long()
        else:
            if a.norm == "tensor":
                s = g2.square().mean().sqrt()
            elif a.norm == "row":
                s = g2.square().mean(dim=1, keepdim=True).sqrt()
            elif a.norm == "fact":  # Adafactor-style: rms over the row times rms over the column / rms overall
                g = g2[:, : self.cols].square()
                rm, cm = g.mean(dim=1, keepdim=True), g.mean(dim=0, keepdim=True)
                s = torch.zeros_like(g2)
                s[:, : self.cols] = (rm * cm / g.mean().clamp_min(1e-300)).sqrt()
            else:  # absmax of the tensor
                s = g2.abs().amax()
            p = (m * g2.abs() / (a.tau * s + 1e-30)).clamp(max=float(a.q))
            k = p.floor() + (torch.rand(g2.shape, device=g2.device, generator=gen) < p - p.floor()).float()
            r = -sg * k.long()  # stochastic rounding of the normalized gradient, at most q per step
        th = a.theta
        c = (self.fa + r).clamp(-th, th)
        if a.bound:  # a counter keeps no evidence in a direction its trit cannot move
            c = torch.where(T >= 1, c.clamp(max=0), torch.where(T <= -1, c.clamp(min=0), c))
        upf = (c >= th) & (T < 1)
        dnf = (c <= -th) & (T > -1)
        T = T + upf.long() - dnf.long()
        c = torch.where(upf | dnf, torch.zeros_like(c), c)
        if a.decay and step % a.decay == 0:  # pull counters toward 0 (forget stale votes)
            c = c - torch.sign(c)
        self.fa = c
        self.T = T.to(torch.int8)
        return int((upf | dnf).sum())


@torch.no_grad()
def evaluate(model, val, context, device, batch_size: int = 16) -> float:
    """Mean validation loss (nats/byte) on the windows arbs.training.evaluate.evaluate uses (batch 16, 8 batches)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in data_mod.eval_batches(val, batch_size=batch_size, context=context, max_batches=8):
        _, loss = model(x.to(device), y.to(device))
        total += float(loss) * x.numel()
        n += x.numel()
    model.train()
    return total / n


def run(a) -> dict:
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = get_preset(a.preset)
    c = data_mod.load_corpus(a.data) if a.data else data_mod.default_corpus()
    tr, va = c.train, c.val
    model = GPT(cfg)
    if a.init:
        from arbs.training.build import load_float_init

        load_float_init(model, a.init)
    scheme = formats.make_scheme("E1TM32", "flip", K=a.K, theta=a.theta)
    params = {n: p for n, p in model.named_parameters()}
    def mult(n):
        return a.init_scale_emb if (n == "wte.weight" and a.init_scale_emb) else a.init_scale

    ints = {n: IntWeight(p.detach().numpy().copy() * mult(n), scheme, device) for n, p in params.items()}
    if a.vote == "fp32":
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.mul_(mult(n))
    model.to(device)
    params = {n: p for n, p in model.named_parameters()}
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)
    fuse_from = a.steps - round(a.fuse_phase * a.steps)
    hist = []
    t0 = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0) if a.vote == "fp32" else None
    sopt = torch.optim.Adam([w.float_scales() for w in ints.values()], lr=a.slr, betas=(a.sbeta1, 0.999)) if a.svote == "adam" else None
    res0 = {}
    if a.init:  # the float model, then its one-shot conversion, before any step
        res0["val_float_init"] = evaluate(model, va, cfg.context, device, a.batch_size)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ints[n].w_eff())
        res0["val_converted"] = evaluate(model, va, cfg.context, device, a.batch_size)
        print(json.dumps(res0), flush=True)
    a.fuse_from = fuse_from
    for step in range(a.steps):
        rounded = step >= fuse_from
        if a.snap and step == fuse_from:
            for w in ints.values():
                w.snap()
        if opt is not None:
            for g in opt.param_groups:
                g["lr"] = a.lr * lr_mult("cos", step, a.steps, a.floor)
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(ints[n].w_eff(rounded))
        x, y = data_mod.get_batch(tr, batch_size=a.batch_size, context=cfg.context, seed=a.seed, step=step)
        _, loss = model(x.to(device), y.to(device))
        loss.backward()
        flips = 0
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
            params = {}
        with torch.no_grad():
            for n, p in params.items():
                flips += ints[n].update(p.grad, a, step, gen)
                p.grad = None
        if sopt is not None:
            for g in sopt.param_groups:
                g["lr"] = a.slr * lr_mult("cos", step, a.steps, a.floor)
            sopt.step()
        if (step + 1) % 100 == 0:
            hist.append({"step": step + 1, "loss": float(loss), "flips": flips})
            print(json.dumps(hist[-1]), flush=True)
    res = {"args": vars(a), "hist": hist, "s": time.time() - t0, **res0}
    for rounded in (False, True) if opt is None else (False,):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ints[n].w_eff(rounded))
        res["val_fused" if rounded else "val"] = evaluate(model, va, cfg.context, device, a.batch_size)
    res.setdefault("val_fused", res["val"])
    print(json.dumps({k: res[k] for k in ("val", "val_fused", "s")}), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res))
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--theta", type=int, default=8)
    p.add_argument("--vote", choices=("sign", "stoch", "fp32"), default="sign")
    p.add_argument("--norm", choices=("tensor", "row", "max", "fact"), default="tensor")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--q", type=int, default=1, help="largest trit vote per step (stoch)")
    p.add_argument("--sched", choices=("const", "cos", "cos0"), default="const")
    p.add_argument("--decay", type=int, default=0)
    p.add_argument("--bound", action="store_true", help="clamp a counter at 0 on the side its trit cannot move")
    p.add_argument("--snap", action="store_true", help="at the fuse phase: E = round(E + Xi), corr = 0, scales frozen")
    p.add_argument("--floor", type=float, default=0.1, help="final lr multiplier of --sched cos")
    p.add_argument("--svote", choices=("sign", "stoch", "adam", "signm", "gsign"), default="sign",
                   help="scale votes; adam: float log2-scales trained by Adam (a ceiling, not integer)")
    p.add_argument("--slr", type=float, default=1e-2, help="--svote adam: peak lr (cosine to 10%%)")
    p.add_argument("--sbeta1", type=float, default=0.9, help="--svote adam: beta1 (0: no momentum)")
    p.add_argument("--sstep", type=float, default=1.0, help="--svote signm/gsign: peak vote multiplier")
    p.add_argument("--sdet", action="store_true", help="--svote signm/gsign: k = round(m*sstep) (deterministic)")
    p.add_argument("--carry", action="store_true", help="trits frozen: the carry rule (scale votes only)")
    p.add_argument("--init", default=None, help="start from this float model (an fp32 run dir), converted")
    p.add_argument("--taus", type=float, default=0.125)
    p.add_argument("--sclamp", type=int, default=1, help="--svote stoch: largest scale vote, in units of gs")
    p.add_argument("--fuse-phase", type=float, default=0.25)
    p.add_argument("--init-scale", type=float, default=1.0, help="multiply the float init (arbs.models.gpt's, already init_std(d_model)) before converting")
    p.add_argument("--init-scale-emb", type=float, default=0.0, help="the embedding's own --init-scale (0: same)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="what arbs train --data reads (default: the stdlib corpus)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (arbs train's default)")
    p.add_argument("--lr", type=float, default=3e-3, help="float runs: AdamW peak learning rate (arbs train's default)")
    p.add_argument("--out", default=None)
    return p


if __name__ == "__main__":
    run(parser().parse_args())
