"""The model a run describes: built from its ``meta``, loaded from and saved to checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from .. import data as data_mod
from .. import formats, ops, store
from .. import nn as arbs_nn
from ..convert import load_float_state
from ..errors import ConfigError
from ..fuse import checkpoint_weights, fuse_checkpoint
from ..models import hf
from ..models.gpt import GPT, GPTConfig
from ..nn import baselines

log = logging.getLogger(__name__)


def model_config(meta: dict) -> GPTConfig:
    """The GPTConfig a run's ``meta["model"]`` records; ConfigError if this arbs cannot build it."""
    m = meta.get("model")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if not isinstance(m, dict) or not set(m) <= known:
        extra = sorted(set(m) - known) if isinstance(m, dict) else m
        raise ConfigError(f"the checkpoint's model config has {extra!r}, which this arbs does not know "
                          f"(it knows {sorted(known)}); it was likely written by another arbs version")
    return GPTConfig.from_dict(m)


def build(meta: dict, ckpt: store.Checkpoint | None = None, *, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model a run's meta describes, in training form, with ``ckpt``'s state loaded if given.

    Returns (model, handles) where handles holds 'clock' (E1TM) or 'optimizer' (float baselines).
    A Hugging Face run (``meta["model"]["kind"] == "hf"``) builds :func:`hf_float_model` instead of the GPT;
    its float baselines (fp32, absmean) train that folded model with AdamW, every parameter (norm gains folded
    into the layers as for E1TM, so every row starts from the same function), absmean quantizing each Linear
    and Embedding as the built-in GPT's baselines do.
    """
    is_hf = hf.is_hf_meta(meta)
    cfg = None if is_hf else model_config(meta)
    seed = meta.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ConfigError(f"the run's meta has seed {seed!r}; expected an integer 0 .. 2**63-1 "
                          "(was it written by another arbs version?)")
    torch.manual_seed(seed)
    model = hf_float_model(meta, from_source=ckpt is None) if is_hf else GPT(cfg)
    fmt = meta["format"]
    if is_hf and not formats.is_e1tm(fmt):
        from .config import HF_FLOAT_FORMATS

        if fmt not in HF_FLOAT_FORMATS:
            raise ConfigError(f"a Hugging Face model trains in E1TM formats and {', '.join(HF_FLOAT_FORMATS)}; "
                              f"this run's format is {fmt!r}")
        for p in model.parameters():  # a float baseline trains every parameter (E1TM keeps them frozen)
            p.requires_grad_(True)
    handles: dict = {}
    if formats.is_e1tm(fmt):
        init = None  # --init: a float model is loaded before ternarize_, an E1TM checkpoint's state after it
        if meta.get("init") and ckpt is None:
            init = open_init(meta["init"])
            if init is None or init.kind == "float":
                load_float_init(model, meta["init"], init)
        model = arbs_nn.ternarize_(model, fmt, meta["rule"], **meta.get("rule_params", {}), seed=meta["seed"])
        handles["clock"] = arbs_nn.model_clock(model)
        if ckpt is not None:
            arbs_nn.load_tensor_states(model, {n: t.arrays for n, t in ckpt.tensors.items()}, ckpt.step_counter)
            if is_hf:
                hf.load_floats_(model, ckpt.float_params)
        elif init is not None and init.kind == "e1tm":
            init_from_e1tm(model, init)
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


def hf_run_record(model_dir: str, *, context: int | None, run_dir: Path, resume: bool, writer: bool = True) -> dict:
    """``{"model": identity, "hf": record}`` of a Hugging Face run (arbs.models.hf.run_record): from the
    run's own checkpoint when it resumes one (the model directory is not read again), else from
    ``model_dir``. The caller holds the run's writer lock (``writer``; else, a data-parallel rank other than 0,
    the run is only read)."""
    if resume and run_dir.is_dir() and store.list_checkpoints(run_dir):
        meta = (store.open_latest_for_resume(run_dir) if writer else store.open_checkpoint(run_dir)).meta
        if not hf.is_hf_meta(meta):
            raise ConfigError(f"--resume {run_dir}: the run trains the built-in GPT, not a Hugging Face model; "
                              "resume it without --model")
        return {"model": meta["model"], "hf": meta["hf"]}
    model, record = hf.run_record(hf.read_source(model_dir), context=context)
    return {"model": model, "hf": record}


def hf_float_model(meta: dict, *, from_source: bool) -> torch.nn.Module:
    """The float :class:`arbs.models.hf.CausalLM` of a Hugging Face run, its norms folded.

    ``from_source``: with the weights of the directory the run was made from (a new run; its config must
    be the one recorded); else rebuilt from the recorded config with random weights (torch's RNG), for a
    checkpoint's state to replace."""
    rec, ident = meta.get("hf"), meta["model"]
    if not isinstance(rec, dict):
        raise ConfigError("the run's meta has no 'hf' record to build its Hugging Face model from")
    if not from_source:
        return hf.from_record(ident, rec)
    src = hf.read_source(rec["source"], tokenizer=False)
    if hf.run_record(src, context=ident["context"], head=rec.get("head", "keep"))[0] != ident:
        raise ConfigError(f"the model directory '{rec['source']}' changed while the run started; start it again")
    model, report = hf.load_folded(src, context=ident["context"], head=rec.get("head", "keep"))
    floats = hf.float_state(model)
    log.info("%s: folded %d norms into the layers reading them (head: %s); %d float parameters (%d values) stay "
             "float and frozen", src.path, len(report.folded), report.head, len(floats),
             sum(p.numel() for p in floats.values()))
    return model


def run_corpus(run: dict, corpus: data_mod.Corpus, *, cache_dir=None) -> data_mod.Corpus:
    """The corpus as a run's model reads it: ``corpus`` (bytes) for the built-in GPT; for a Hugging Face
    run (``run`` holds its ``model`` and ``hf`` meta) its token ids, made with the run's own tokenizer."""
    if not hf.is_hf_meta(run):
        return corpus
    rec = run["hf"]
    tok = hf.load_tokenizer(hf.tokenizer_bytes(rec))
    return data_mod.tokenize_corpus(corpus, hf.encoder(tok), tokenizer_sha256=rec["tokenizer"]["sha256"],
                                    vocab_size=int(run["model"]["vocab_size"]), cache_dir=cache_dir)


def open_init(path: str) -> store.Checkpoint | None:
    """The checkpoint an ``--init`` directory (a run or a ``step_<N>`` directory) holds; None for a file."""
    p = Path(path)
    return store.open_checkpoint(p) if p.is_dir() else None


def load_float_init(model: torch.nn.Module, path: str, ck: store.Checkpoint | None = None) -> None:
    """Load a float model (an arbs fp32 run, a .safetensors file or a torch state dict) into ``model``.
    ``ck``: the checkpoint of ``path`` when the caller has opened it (:func:`open_init`)."""
    p = Path(path)
    if p.is_dir():
        ck = ck if ck is not None else store.open_checkpoint(p)
        if ck.kind != "float" or ck.meta.get("format") != "fp32":
            got = f"an E1TM {ck.format} checkpoint" if ck.kind == "e1tm" else f"a {ck.meta.get('format')!r} float run"
            raise ConfigError(f"--init {path}: expected an fp32 float run here, got {got} "
                              "(an E1TM init is loaded after ternarize_: init_from_e1tm)")
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


def init_from_e1tm(model: torch.nn.Module, init: store.Checkpoint) -> None:
    """Start a ternarized ``model`` (a new run, step 0) from the integer state of E1TM checkpoint ``init``.

    Copied as integers, never through floats: ``T_packed`` and ``E``; ``corr_accum`` when both rules read it
    the same way (carry/flip with equal K), else the init's scales are first fused into E (E = rint(E + Xi),
    corr_accum = 0, as ``arbs fuse`` does; a fused init has corr_accum 0 already); ``flip_accum`` when both
    rules are flip with equal theta, else 0. The run's format must be the init's (the same groups). A model
    that keeps float parameters (not the built-in GPT) takes the init's ``float_params``, which must match.
    """
    clock = arbs_nn.model_clock(model)
    s = clock.scheme
    src = f"--init {init.path}"
    if init.format != s.format:
        raise ConfigError(f"{src} is an {init.format} checkpoint (gs={init.gs}), but this run's --format is {s.format} "
                          f"(gs={s.gs}); an E1TM init keeps its groups: pass --format {init.format}")
    floats = arbs_nn.float_parameters(model)  # none in the built-in GPT; a model that keeps some takes the init's
    missing, extra = sorted(set(floats) - set(init.float_params)), sorted(set(init.float_params) - set(floats))
    bad = [n for n, p in floats.items()
           if n in init.float_params and tuple(init.float_params[n].shape) != tuple(p.shape)]
    if missing or extra or bad:
        raise ConfigError(f"{src} does not fit the model's float parameters: the model's {missing[:5]} are not in it, "
                          f"its {extra[:5]} are not in the model, shapes differ for {bad[:5]}; it was saved from "
                          "another model")
    same_scale = (not init.fused and init.rule in ("carry", "flip") and s.rule in ("carry", "flip")
                  and init.rule_params["K"] == s.params["K"])
    same_flip = (not init.fused and init.rule == "flip" and s.rule == "flip"
                 and init.rule_params["theta"] == s.params["theta"])
    init_scheme = None if init.fused else formats.make_scheme(init.format, init.rule, **init.rule_params)
    states, shapes, fused_groups = {}, {}, 0
    for name, t in init.tensors.items():
        a = t.arrays
        E, corr = a["E"], np.zeros(a["E"].shape, np.int64)
        if same_scale:
            corr = a["corr_accum"]
        elif not init.fused and np.any(a["corr_accum"]):
            E, st = ops.fuse(a, t.shape, init_scheme, init.step_counter)
            fused_groups += st.changed
        arrays = {"T_packed": a["T_packed"], "E": E, "corr_accum": corr}
        if s.rule == "flip":
            arrays["flip_accum"] = a["flip_accum"] if same_flip else np.zeros(
                formats.array_shape("flip_accum", *formats.tensor_view(t.shape), s.gs), np.int8)
        states[name], shapes[name] = arrays, t.shape
    try:
        arbs_nn.load_tensor_states(model, states, 0, shapes=shapes)
    except ConfigError as e:
        raise ConfigError(f"{src} does not fit the model: {e} (use the --preset/--context the init run used)") from None
    with torch.no_grad():
        for n, p in floats.items():  # the model's own float parameters (biases, norm gains), not E1TM state
            p.copy_(torch.from_numpy(np.asarray(init.float_params[n])))
    how = "fused checkpoint: corr_accum 0" if init.fused else (
        "corr_accum copied" if same_scale else f"scales fused into E ({fused_groups} groups changed), corr_accum 0")
    flip = "" if s.rule != "flip" else ("; flip_accum copied" if same_flip else "; flip_accum 0")
    log.info("%s: integer state of %d tensors from %s rule %s at step %s (%s%s); this run starts at step 0",
             src, len(states), init.format, init.rule, init.step_counter, how, flip)
    if not init.fused and not same_scale and fused_groups:
        log.warning("%s: rule %s (K=%s) reads corr_accum unlike this run's rule %s (K=%s), so the init's scales were "
                    "rounded into E first; W_eff at step 0 is the init's fused W_eff", src, init.rule,
                    init.rule_params.get("K"), s.rule, s.params.get("K"))


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
        floats = {n: p.detach().cpu().float().numpy().copy() for n, p in model.named_parameters()}  # HF: biases
        return store.Checkpoint(
            kind="e1tm", format=fmt, gs=formats.variant_gs(fmt), rule=clock.scheme.rule,
            rule_params=dict(clock.scheme.params), fused=False, step_counter=step, tensors=tensors, meta=meta,
            float_params=floats,
        )
    return store.Checkpoint(
        kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=step,
        tensors=_float_tensors(model, handles["optimizer"]), meta=meta,
    )


def fused_model(ckpt: store.Checkpoint, device="cpu") -> torch.nn.Module:
    """A float GPT whose weights are the fused (rounded-scale) W_eff of an E1TM checkpoint (ephemeral);
    for a Hugging Face run its float CausalLM, with the checkpoint's float parameters."""
    fck = ckpt if ckpt.fused else fuse_checkpoint(ckpt)[0]
    if hf.is_hf_meta(ckpt.meta):
        model = hf.from_record(ckpt.meta["model"], ckpt.meta.get("hf"))
        hf.load_weights_(model, checkpoint_weights(fck))
        hf.load_floats_(model, fck.float_params)
        return model.to(device)
    model = GPT(model_config(ckpt.meta))
    weights = checkpoint_weights(fck)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.to(device)


def autocast(device: str):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
