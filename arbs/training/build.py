"""The model a run describes: built from its ``meta``, loaded from and saved to checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from .. import formats, store
from .. import nn as arbs_nn
from ..convert import load_float_state
from ..errors import ConfigError
from ..fuse import checkpoint_weights, fuse_checkpoint
from ..models.gpt import GPT, GPTConfig
from ..nn import baselines


def model_config(meta: dict) -> GPTConfig:
    """The GPTConfig a run's ``meta["model"]`` records; ConfigError if this arbs cannot build it."""
    m = meta.get("model")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if not isinstance(m, dict) or not set(m) <= known:
        extra = sorted(set(m) - known) if isinstance(m, dict) else m
        raise ConfigError(f"the checkpoint's model config has {extra!r}, which this arbs does not know "
                          f"(it knows {sorted(known)}); it was likely written by another arbs version")
    return GPTConfig(**m)


def build(meta: dict, ckpt: store.Checkpoint | None = None, *, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model a run's meta describes, in training form, with ``ckpt``'s state loaded if given.

    Returns (model, handles) where handles holds 'clock' (E1TM) or 'optimizer' (float baselines).
    """
    cfg = model_config(meta)
    seed = meta.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ConfigError(f"the run's meta has seed {seed!r}; expected an integer 0 .. 2**63-1 "
                          "(was it written by another arbs version?)")
    torch.manual_seed(seed)
    model = GPT(cfg)
    fmt = meta["format"]
    handles: dict = {}
    if formats.is_e1tm(fmt):
        if meta.get("init") and ckpt is None:
            load_float_init(model, meta["init"])
        model = arbs_nn.ternarize_(model, fmt, meta["rule"], **meta.get("rule_params", {}), seed=meta["seed"])
        handles["clock"] = arbs_nn.model_clock(model)
        if ckpt is not None:
            arbs_nn.load_tensor_states(model, {n: t.arrays for n, t in ckpt.tensors.items()}, ckpt.step_counter)
        model.to(device)
    else:
        baselines.quantize_(model, fmt, gs=meta.get("gs", 32), threshold=meta.get("baseline_threshold", meta.get("baseline_theta", 0.5)))
        model.to(device)
        groups = [{"params": baselines.latent_parameters(model), "weight_decay": meta["weight_decay"]},
                  {"params": baselines.quantizer_parameters(model), "weight_decay": 0.0}]
        handles["optimizer"] = torch.optim.AdamW([g for g in groups if g["params"]], lr=meta["lr"])
        if ckpt is not None:
            _load_float_state(model, handles["optimizer"], ckpt)
    return model, handles


def load_float_init(model: torch.nn.Module, path: str) -> None:
    """Load a float model (an arbs fp32 run, a .safetensors file or a torch state dict) into ``model``."""
    p = Path(path)
    if p.is_dir():
        ck = store.open_checkpoint(p)
        if ck.kind != "float" or ck.meta.get("format") != "fp32":
            raise ConfigError(f"--init {path}: expected an fp32 float run, got {ck.kind} {ck.meta.get('format')!r}")
        sd = {n: torch.from_numpy(t.arrays["weight"]) for n, t in ck.tensors.items()}
    else:
        sd = {k: torch.from_numpy(np.asarray(v)) for k, v in load_float_state(p).items()}
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(sd))
    if bad or missing:
        raise ConfigError(
            f"--init {path} does not fit the model: "
            + (f"shape mismatch {bad[:3]}" if bad else f"missing tensors {missing[:5]}")
            + " (use the same --preset/--context the float run used)"
        )
    model.load_state_dict({k: sd[k] for k in own})


def _float_tensors(model, optimizer) -> dict[str, store.TensorState]:
    out = {}
    for name, p in model.named_parameters():
        arrays = {"weight": p.detach().cpu().numpy().copy()}
        st = optimizer.state.get(p, {})
        for k, v in st.items():
            arrays[k] = v.detach().cpu().numpy().reshape(-1 if v.ndim == 0 else v.shape).copy()
        out[name] = store.TensorState(name=name, shape=tuple(p.shape), arrays=arrays)
    return out


def _load_float_state(model, optimizer, ckpt: store.Checkpoint) -> None:
    named = dict(model.named_parameters())
    if set(named) != set(ckpt.tensors):
        raise ConfigError(f"checkpoint {ckpt.path} does not match the model's parameters")
    with torch.no_grad():
        for name, p in named.items():
            t = ckpt.tensors[name]
            p.copy_(torch.from_numpy(t.arrays["weight"]))
            if "exp_avg" in t.arrays:
                optimizer.state[p] = {
                    "step": torch.tensor(float(t.arrays["step"].reshape(()))),
                    "exp_avg": torch.from_numpy(t.arrays["exp_avg"]).to(p.device),
                    "exp_avg_sq": torch.from_numpy(t.arrays["exp_avg_sq"]).to(p.device),
                }


def to_checkpoint(model, handles, meta: dict, step: int) -> store.Checkpoint:
    fmt = meta["format"]
    if formats.is_e1tm(fmt):
        clock = handles["clock"]
        tensors = {n: store.TensorState(name=n, shape=s, arrays=a) for n, (s, a) in arbs_nn.tensor_states(model).items()}
        return store.Checkpoint(
            kind="e1tm", format=fmt, gs=formats.variant_gs(fmt), rule=clock.scheme.rule,
            rule_params=dict(clock.scheme.params), fused=False, step_counter=step, tensors=tensors, meta=meta,
        )
    return store.Checkpoint(
        kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=step,
        tensors=_float_tensors(model, handles["optimizer"]), meta=meta,
    )


def fused_model(ckpt: store.Checkpoint, device="cpu") -> torch.nn.Module:
    """A float GPT whose weights are the fused (rounded-scale) W_eff of an E1TM checkpoint (ephemeral)."""
    fck = ckpt if ckpt.fused else fuse_checkpoint(ckpt)[0]
    model = GPT(model_config(ckpt.meta))
    weights = checkpoint_weights(fck)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.to(device)


def autocast(device: str):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
