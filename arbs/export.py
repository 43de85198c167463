"""Export a checkpoint to where models run: Hugging Face (transformers), GGUF (llama.cpp) or one portable E1TM file.

Every export of an E1TM model writes the fused weights ``W_eff = 2**E * T`` exactly and proves it: each
tensor is read back (safetensors) or dequantized (``gguf.quants.dequantize``) and compared bit for bit
before the file is moved into place. A lossy GGUF type is refused unless ``allow_lossy``, and then each
tensor's error is reported.

* ``hf``: a directory ``from_pretrained`` loads: config.json, model.safetensors, tokenizer files. The
  built-in byte GPT (swiglu MLP) is a Llama (``LlamaForCausalLM``: RoPE NeoX layout, RMSNorm eps 1e-6 with
  gains 1, SwiGLU, tied embeddings, a 256-token byte tokenizer whose ids are the bytes); a Hugging Face run
  keeps its own architecture (norm gains folded into the linears are exported as 1, its biases and a kept
  final norm as they are). bf16 when every value round-trips bf16 exactly (always, for ``2**E`` with int8
  E and no float part), else float32.
* ``gguf``: llama.cpp's ``llama`` architecture (the byte GPT only), Q and K rows permuted to llama.cpp's
  interleaved RoPE order (a row permutation: every row keeps its groups). Types: :data:`GGUF_TYPES`.
* ``e1tm``: :mod:`arbs.store.portable` (T_packed + E per tensor, the run's meta), which ``arbs eval`` and
  ``arbs generate`` open like a checkpoint directory.

A training checkpoint is refused unless ``fuse=True`` (then fused in memory, as ``arbs fuse`` would; the
checkpoint is not changed); ``grid`` fuses onto a coarser scale grid first (``arbs fuse --grid``).
"""

from __future__ import annotations

import dataclasses
import logging
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import formats, store
from .store import durable
from .errors import ConfigError
from .fuse import checkpoint_weights, fuse_checkpoint
from .models import hf
from .models.config import GPTConfig

log = logging.getLogger(__name__)

TARGETS = ("hf", "gguf", "e1tm")
ROPE_THETA = 10000.0  # arbs.models.gpt.ROPE_BASE (kept here so that this module imports no torch)
RMS_EPS = 1e-6  # arbs.models.gpt.NORM_EPS
PARAMETER_GOLF = {"params": 68_000_000, "bytes": 15_880_000}  # ternary params in an lzma'd artifact


@dataclass(frozen=True)
class GgufType:
    """One GGUF tensor type: block of ``block`` weights in ``nbytes`` bytes; ``levels``: the integer levels a
    block holds times one fp16 scale (None: a float type)."""

    name: str
    ggml: str  # gguf.GGMLQuantizationType member
    block: int
    nbytes: int
    levels: tuple[int, int] | None  # (lowest, highest) integer q with W = d * q

    @property
    def bits(self) -> float:
        return 8 * self.nbytes / self.block


GGUF_TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("tq1_0", "TQ1_0", 256, 54, (-1, 1)),
    GgufType("tq2_0", "TQ2_0", 256, 66, (-1, 1)),
    GgufType("q4_0", "Q4_0", 32, 18, (-8, 7)),
    GgufType("q8_0", "Q8_0", 32, 34, (-128, 127)),
    GgufType("bf16", "BF16", 1, 2, None),
    GgufType("f16", "F16", 1, 2, None),
    GgufType("f32", "F32", 1, 4, None),
)}
FLOAT_TYPES = ("bf16", "f16", "f32")


@dataclass(frozen=True)
class TensorExport:
    name: str  # the name in the output (HF or GGUF)
    source: str  # the arbs tensor it comes from
    shape: tuple[int, ...]
    dtype: str  # hf: bfloat16/float32; gguf: the type
    exact: bool
    rel_l2: float = 0.0  # ||written - W|| / ||W|| (0 when exact)
    max_abs: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class ExportReport:
    to: str
    path: str
    source: str
    kind: str  # "e1tm" or "float"
    format: str  # E1TM variant or float baseline
    model: str  # "gpt" (built-in byte model, exported as llama) or the HF model_type
    fused_in_memory: bool
    weights: int  # weights of the Linear/Embedding tensors
    file_bytes: int
    tensors: tuple[TensorExport, ...] = ()
    dtype: str | None = None  # hf: the dtype of the weights; gguf: the type asked for (None: smallest exact)
    bpw_file: float = 0.0  # file bits per weight
    bpw_inspect: float | None = None  # arbs inspect --bpw inference figure of the source (E1TM)
    xz_bytes: int | None = None  # e1tm: lzma (xz) compressed size
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exact"] = self.exact
        return d


# --------------------------------------------------------------------------------------------------------
# what a checkpoint computes with


@dataclass
class _Model:
    """The weights a checkpoint's model computes with, by arbs name, as float32."""

    ckpt: store.Checkpoint
    weights: dict[str, np.ndarray]  # Linear/Embedding weights (fused W_eff for E1TM)
    floats: dict[str, np.ndarray]  # other parameters (HF runs: biases, a kept final norm)
    fused_in_memory: bool
    notes: list[str] = field(default_factory=list)

    @property
    def is_hf(self) -> bool:
        return hf.is_hf_meta(self.ckpt.meta)

    @property
    def fmt(self) -> str:
        return self.ckpt.format if self.ckpt.kind == "e1tm" else str(self.ckpt.meta.get("format"))


def _where(ckpt) -> str:
    return f"'{ckpt.path}'" if ckpt.path is not None else "the checkpoint"


def _fused(ckpt, *, fuse: bool, grid: int | None) -> tuple[store.Checkpoint, bool]:
    if ckpt.kind != "e1tm":
        if grid is not None:
            raise ConfigError(f"{_where(ckpt)} is a float-baseline run ({ckpt.meta.get('format')}); --grid fuses E1TM scales")
        return ckpt, False
    if ckpt.fused:
        if grid is not None:
            return fuse_checkpoint(ckpt, grid=grid)[0], True
        return ckpt, False
    if not fuse:
        raise ConfigError(
            f"{_where(ckpt)} is a training checkpoint (rule {ckpt.rule}, step {ckpt.step_counter}); export writes "
            "fused weights. Fuse it first ('arbs fuse CKPT', then export the fused run) or pass --fuse to fuse "
            "it in memory (the checkpoint is not changed)")
    return fuse_checkpoint(ckpt, grid=grid)[0], True


def _float_model_weights(ckpt) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(weights, other parameters) a float-baseline run computes with: each quantizing layer's ``W_q``."""
    import torch

    from .training.build import build

    model, _ = build(ckpt.meta, ckpt)
    weights, floats = {}, {}
    seen = set()
    with torch.no_grad():
        for n, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and id(w) not in seen:
                seen.add(id(w))
                q = getattr(m, "quantizer", None)
                eff = q(w) if q is not None else w
                weights[f"{n}.weight"] = eff.detach().float().numpy().copy()
        for n, p in model.named_parameters():
            if id(p) not in seen:
                floats[n] = p.detach().float().numpy().copy()
    return weights, floats


def load_model(src, *, fuse: bool = False, grid: int | None = None) -> _Model:
    ckpt = store.open_checkpoint(src)
    if not isinstance(ckpt.meta, dict) or "model" not in ckpt.meta:
        raise ConfigError(f"{_where(ckpt)} holds no model config (made by 'arbs convert' from a weights file): "
                          "export works on runs made by 'arbs train' (or their fused/e1tm exports)")
    fck, fused_now = _fused(ckpt, fuse=fuse, grid=grid)
    if fck.kind == "e1tm":
        weights = checkpoint_weights(fck)
        floats = {n: np.asarray(a, np.float32) if a.dtype == np.float16 else np.asarray(a)
                  for n, a in fck.float_params.items()}
    else:
        weights, floats = _float_model_weights(fck)
    return _Model(fck, weights, floats, fused_now)


def _gpt_config(m: _Model, to: str) -> GPTConfig:
    cfg = GPTConfig.from_dict(dict(m.ckpt.meta["model"]))
    if cfg.mlp != "swiglu":
        raise ConfigError(
            f"{_where(m.ckpt)} is a byte GPT with the {cfg.mlp!r} MLP (trained before arbs made the built-in model a "
            f"Llama); no standard architecture matches it, so --to {to} cannot export it. Export it with "
            "'--to e1tm' (arbs eval/generate read it), or train it again")
    return cfg


# --------------------------------------------------------------------------------------------------------
# the byte GPT as a Llama


def llama_config(cfg: GPTConfig) -> dict:
    """transformers LlamaConfig keyword arguments for the built-in byte GPT."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                head_dim=cfg.head_size, max_position_embeddings=cfg.context, rms_norm_eps=RMS_EPS,
                rope_theta=ROPE_THETA, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None)


def llama_state(cfg: GPTConfig, W: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """HF Llama parameter name -> (arbs source name, array) for the byte GPT's weights ``W`` (norm gains 1)."""
    C, H = cfg.d_model, cfg.hidden_size
    ones = np.ones(C, np.float32)
    out = {"model.embed_tokens.weight": ("wte.weight", W["wte.weight"]), "model.norm.weight": ("(gain 1)", ones)}
    for i in range(cfg.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        qkv, fc = W[b + "attn.qkv.weight"], W[b + "mlp.fc.weight"]
        out[p + "input_layernorm.weight"] = ("(gain 1)", ones)
        out[p + "post_attention_layernorm.weight"] = ("(gain 1)", ones)
        for j, k in enumerate("qkv"):
            out[p + f"self_attn.{k}_proj.weight"] = (b + "attn.qkv.weight", qkv[j * C:(j + 1) * C])
        out[p + "self_attn.o_proj.weight"] = (b + "attn.proj.weight", W[b + "attn.proj.weight"])
        out[p + "mlp.gate_proj.weight"] = (b + "mlp.fc.weight", fc[:H])
        out[p + "mlp.up_proj.weight"] = (b + "mlp.fc.weight", fc[H:])
        out[p + "mlp.down_proj.weight"] = (b + "mlp.proj.weight", W[b + "mlp.proj.weight"])
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the 256 base tokens of every byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer():
    """A ``tokenizers.Tokenizer`` whose token ids are the bytes of the UTF-8 text (256 tokens, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# --------------------------------------------------------------------------------------------------------
# HF runs: their own architecture


def _hf_state(m: _Model, model) -> dict[str, tuple[str, np.ndarray]]:
    """HF parameter name -> (source, array) for a Hugging Face run, from an HF ``model`` of its architecture."""
    import torch.nn as nn

    conv = {n for n, mod in model.named_modules() if type(mod).__name__ == "Conv1D"}
    norms = {n for n, mod in model.named_modules()
             if isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for name, p in model.state_dict().items():
        key = hf.PREFIX + name
        mod, _, leaf = name.rpartition(".")
        if key in m.weights:
            a = m.weights[key]
            out[name] = (key, a.T.copy() if mod in conv and leaf == "weight" else a)
        elif key in m.floats:
            out[name] = (key, m.floats[key])
        elif mod in norms:
            out[name] = ("(gain 1)" if leaf == "weight" else "(bias 0)",
                         (np.ones if leaf == "weight" else np.zeros)(tuple(p.shape), np.float32))
        elif tied and name == "lm_head.weight":
            continue
        elif not p.is_floating_point() or name.endswith(".attn.bias") or name.endswith("masked_bias"):
            continue  # buffers (GPT-2's causal mask) that transformers rebuilds
        else:
            raise ConfigError(f"the run has no value for {name!r} of its {model.config.model_type} model; "
                              "was it made by another arbs version?")
    return out


def _hf_model_for(m: _Model):
    tf = hf.load_transformers()
    rec = m.ckpt.meta.get("hf")
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        raise ConfigError(f"{_where(m.ckpt)} has no 'hf' record (config) in its meta")
    d = dict(rec["config"])
    mt = d.pop("model_type")
    if hf.PREFIX + "lm_head.weight" in m.weights:
        d["tie_word_embeddings"] = False  # a head untied while folding
    config = tf.AutoConfig.for_model(mt, **d)
    return tf.AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------------------
# the three targets


def export(src, out, *, to: str, type: str | None = None, force: bool = False, fuse: bool = False,
           allow_lossy: bool = False, grid: int | None = None) -> ExportReport:
    """Export the checkpoint at ``src`` (run dir, step dir or e1tm file) to ``out`` as ``to``.

    ``type``: the GGUF type of every weight tensor (:data:`GGUF_TYPES`; None: per tensor the smallest type
    that holds it exactly); a comma-separated list (``"tq2_0,q4_0"``) gives each tensor the first listed
    type that holds it exactly, the last one regardless. ``force`` replaces an existing ``out``. ``fuse`` fuses a training checkpoint in
    memory (else it is refused); ``grid`` fuses onto a coarser scale grid (``arbs fuse --grid``).
    ``allow_lossy`` lets a GGUF type that cannot hold a tensor exactly quantize it (llama.cpp's quantizer)
    and report the error. Raises ConfigError for any input it refuses; nothing is written then.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}; got {to!r}")
    if type is not None:
        for t in type.split(","):
            formats.lookup(GGUF_TYPES, t, "GGUF type", "types")
        if to != "gguf":
            raise ConfigError(f"--type applies to --to gguf; --to {to} has no types")
    out_p = Path(out)
    durable.check_output(out_p, force, directory=to == "hf")
    m = load_model(src, fuse=fuse, grid=grid)
    if to == "e1tm":
        return _export_e1tm(m, out_p, force)
    if to == "hf":
        return _export_hf(m, out_p, force)
    return _export_gguf(m, out_p, force, type, allow_lossy)


def _n_weights(m: _Model) -> int:
    return int(sum(a.size for a in m.weights.values()))


def _bpw_inspect(ckpt) -> float | None:
    if ckpt.kind != "e1tm":
        return None
    n = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
    return 8 * store.array_nbytes(ckpt, ("T_packed", "E")) / n if n else None


def _report(m: _Model, to: str, out: Path, nbytes: int, **kw) -> ExportReport:
    n = _n_weights(m)
    return ExportReport(to=to, path=os.fspath(out), source=os.fspath(m.ckpt.path) if m.ckpt.path else "",
                        kind=m.ckpt.kind, format=m.fmt,
                        model=(m.ckpt.meta["model"].get("model_type", "hf") if m.is_hf else "gpt"),
                        fused_in_memory=m.fused_in_memory, weights=n, file_bytes=nbytes,
                        bpw_file=8 * nbytes / n if n else 0.0, bpw_inspect=_bpw_inspect(m.ckpt),
                        notes=tuple(m.notes), **kw)


def _export_e1tm(m: _Model, out: Path, force: bool) -> ExportReport:
    if m.ckpt.kind != "e1tm":
        raise ConfigError(f"{_where(m.ckpt)} is a float-baseline run ({m.fmt}); the e1tm file holds integer E1TM "
                          "state only. Export it with --to hf or --to gguf (f32)")
    nbytes = store.write_portable(out, m.ckpt, overwrite=force)
    xz = len(lzma.compress(out.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    log.info("wrote %s: %d bytes, %d xz-compressed", out, nbytes, xz)
    return _report(m, "e1tm", out, nbytes, xz_bytes=xz, dtype="T_packed uint8 + E int8")


def _bf16_exact(a: np.ndarray) -> bool:
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return not np.any(bits & np.uint32(0xFFFF))


def _export_hf(m: _Model, out: Path, force: bool) -> ExportReport:
    import torch
    from safetensors.numpy import load_file

    tf = hf.load_transformers()
    if m.is_hf:
        model = _hf_model_for(m)
        state = _hf_state(m, model)
        tok_json = hf.tokenizer_bytes(m.ckpt.meta.get("hf")).decode("utf-8")
        tokenizer = hf.load_tokenizer(tok_json.encode("utf-8"))
    else:
        cfg = _gpt_config(m, "hf")
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_config(cfg)))
        state = llama_state(cfg, m.weights)
        tokenizer = byte_tokenizer()
    exact_bf16 = all(_bf16_exact(a) for _, a in state.values())
    dtype = torch.bfloat16 if exact_bf16 else torch.float32
    if not exact_bf16:
        m.notes.append("float32: some values (float weights, biases or norm gains) are not exact in bfloat16")
    sd = {k: torch.from_numpy(np.ascontiguousarray(a, np.float32)) for k, (_, a) in state.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",) and not k.endswith(".attn.bias")]
    if missing or unexpected:  # a mapping bug, not an input error
        raise AssertionError(f"HF state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype)
    tmp = durable.tmp_sibling(out, "export")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp)
        # proof: every tensor read back equals what the model computes with, bit for bit (upcast to float32)
        got = {}
        for f in sorted(tmp.glob("*.safetensors")):
            got.update({k: v for k, v in _load_safetensors_f32(f, load_file).items()})
        tensors = []
        for k, (srcname, a) in state.items():
            if k not in got:
                if k == "lm_head.weight" or (k.endswith("lm_head.weight") and model.config.tie_word_embeddings):
                    continue
                raise AssertionError(f"{k} missing from the written safetensors")
            b = got[k]
            exact = b.shape == a.shape and np.array_equal(b.view(np.uint32), np.ascontiguousarray(a, np.float32).view(np.uint32))
            tensors.append(TensorExport(k, srcname, tuple(a.shape), "bfloat16" if exact_bf16 else "float32", exact))
        if not all(t.exact for t in tensors):
            bad = [t.name for t in tensors if not t.exact]
            raise AssertionError(f"written tensors differ from the model's weights: {bad[:5]}")
        nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        durable.place(tmp, out, force)
    except BaseException:
        durable.discard(tmp)
        raise
    return _report(m, "hf", out, nbytes, tensors=tuple(tensors), dtype="bfloat16" if exact_bf16 else "float32")


def _load_safetensors_f32(f: Path, load_file) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as float32 (bf16, which numpy lacks, widened bit for bit)."""
    import json
    import struct

    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = np.frombuffer(raw, np.uint8, count=b - a, offset=8 + n + a)
        if v["dtype"] == "BF16":
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif v["dtype"] == "F32":
            arr = buf.view(np.float32)
        elif v["dtype"] == "F16":
            arr = buf.view(np.float16).astype(np.float32)
        else:
            continue
        out[k] = arr.reshape(v["shape"])
    return out


# --------------------------------------------------------------------------------------------------------
# GGUF


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection from the NeoX/HF half layout (pairs i, i + hs/2) to llama.cpp's
    interleaved one (pairs 2i, 2i + 1): within each head, new row 2i = old row i, new 2i+1 = old i + hs/2."""
    rows = w.shape[0]
    hs = rows // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: GPTConfig, W: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(gguf name, arbs source, float32 array) of the byte GPT as llama.cpp's ``llama`` architecture."""
    C, H = cfg.d_model, cfg.hidden_size
    ones = np.ones(C, np.float32)
    out = [("token_embd.weight", "wte.weight", W["wte.weight"])]
    for i in range(cfg.n_layer):
        b, p = f"blocks.{i}.", f"blk.{i}."
        qkv, fc = W[b + "attn.qkv.weight"], W[b + "mlp.fc.weight"]
        out += [
            (p + "attn_norm.weight", "(gain 1)", ones),
            (p + "attn_q.weight", b + "attn.qkv.weight", permute_rope_rows(qkv[:C], cfg.n_head)),
            (p + "attn_k.weight", b + "attn.qkv.weight", permute_rope_rows(qkv[C:2 * C], cfg.n_head)),
            (p + "attn_v.weight", b + "attn.qkv.weight", qkv[2 * C:]),
            (p + "attn_output.weight", b + "attn.proj.weight", W[b + "attn.proj.weight"]),
            (p + "ffn_norm.weight", "(gain 1)", ones),
            (p + "ffn_gate.weight", b + "mlp.fc.weight", fc[:H]),
            (p + "ffn_up.weight", b + "mlp.fc.weight", fc[H:]),
            (p + "ffn_down.weight", b + "mlp.proj.weight", W[b + "mlp.proj.weight"]),
        ]
    out.append(("output_norm.weight", "(gain 1)", ones))
    return out


def _fp16_exact(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).astype(np.float64) == d


def why_not(a: np.ndarray, t: GgufType) -> str | None:
    """None when GGUF type ``t`` holds the 2-D float32 array ``a`` exactly; else the reason, in words."""
    rows, cols = a.shape
    if t.levels is None:
        if t.name == "f32":
            return None
        back = a.astype(np.float16).astype(np.float32) if t.name == "f16" else None
        if t.name == "bf16":
            bad = int(np.count_nonzero(np.ascontiguousarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF)))
        else:
            bad = int(np.count_nonzero(back != a))
        if not bad:
            return None
        if t.name == "f16":
            nz = np.abs(a[a != 0])
            rng = f" (|W| from {nz.min():.3g} to {nz.max():.3g}; f16 holds 2**E exactly for E in -24..15)" if nz.size else ""
            return f"{bad} values are not exact in f16{rng}"
        return f"{bad} values are not exact in bf16 (float weights)"
    if cols % t.block:
        return f"its {cols} weights per row are not a multiple of the {t.name} block of {t.block}"
    blocks = a.reshape(-1, t.block).astype(np.float64)  # (n_blocks, block)
    mag = np.abs(blocks)
    lo, hi = t.levels
    if hi == 1:  # ternary types: one scale, the block's largest |W|
        d = mag.max(axis=1)
    else:  # q4_0/q8_0: the smallest non-zero |W| (the unit all other values are multiples of)
        d = np.where(mag > 0, mag, np.inf).min(axis=1)
        d[~np.isfinite(d)] = 0.0
    safe = np.where(d > 0, d, 1.0)[:, None]
    q = blocks / safe
    on_grid = (np.rint(q) == q) & (q >= lo) & (q <= hi)
    bad_blocks = int(np.count_nonzero(~on_grid.all(axis=1)))
    bad_scale = int(np.count_nonzero(~_fp16_exact(d)))
    if not bad_blocks and not bad_scale:
        return None
    nb = blocks.shape[0]
    if bad_blocks:
        if hi == 1:
            what = (f"{bad_blocks} of its {nb} {t.block}-weight blocks hold more than one scale (groups with different "
                    "E, or float weights); TQ types have one scale per 256 weights: fuse onto that grid "
                    "('arbs fuse --grid 256')")
        else:
            span = {7: 2, 127: 6}[hi]
            what = (f"{bad_blocks} of its {nb} {t.block}-weight blocks hold values that are not d*q with q in "
                    f"{lo}..{hi} (E spread over more than {span} within a block, or float weights)")
        return what
    return f"{bad_scale} of its {nb} block scales 2**E are outside fp16 (E must be in -24..15)"


def _pack(a: np.ndarray, t: GgufType) -> np.ndarray:
    """Bytes (rows, row_bytes) of ``a`` in type ``t`` as llama.cpp lays them out, scale = the exact d of
    :func:`why_not` (q4_0/q8_0, float types) or llama.cpp's own quantizer (TQ types, lossy fallbacks)."""
    import gguf

    rows, cols = a.shape
    if t.name == "f32":
        return np.ascontiguousarray(a, np.float32).view(np.uint8).reshape(rows, -1)
    if t.name == "f16":
        return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(rows, -1)
    if t.name == "bf16":
        bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return rounded.view(np.uint8).reshape(rows, -1)
    if t.name in ("q4_0", "q8_0") and why_not(a, t) is None:
        blocks = a.reshape(-1, t.block).astype(np.float64)
        mag = np.abs(blocks)
        d = np.where(mag > 0, mag, np.inf).min(axis=1)
        d[~np.isfinite(d)] = 0.0
        q = np.rint(blocks / np.where(d > 0, d, 1.0)[:, None]).astype(np.int16)
        dh = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        if t.name == "q8_0":
            qs = q.astype(np.int8).view(np.uint8)
        else:
            u = (q + 8).astype(np.uint8)
            qs = u[:, :16] | (u[:, 16:] << 4)
        return np.concatenate([dh, qs], axis=1).reshape(rows, -1)
    return gguf.quants.quantize(np.ascontiguousarray(a, np.float32), getattr(gguf.GGMLQuantizationType, t.ggml))


def _dequant(packed: np.ndarray, t: GgufType) -> np.ndarray:
    import gguf

    if t.name == "bf16":
        return (packed.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf.quants.dequantize(packed, getattr(gguf.GGMLQuantizationType, t.ggml)).astype(np.float32)


def _choose(a: np.ndarray, float_run: bool) -> tuple[GgufType, list[str]]:
    """The smallest type holding ``a`` exactly, and why each smaller one does not."""
    reasons = []
    for name in (FLOAT_TYPES if float_run else GGUF_TYPES):
        t = GGUF_TYPES[name]
        r = why_not(a, t)
        if r is None:
            return t, reasons
        reasons.append(f"{name}: {r}")
    raise AssertionError("f32 holds every float32 array")


def add_byte_vocab(w) -> None:
    """The 256-token byte vocabulary on GGUFWriter ``w``: llama.cpp tokenizes text byte for byte (token id =
    byte). A gpt2-model vocabulary of GPT-2's 256 byte characters; llama.cpp needs at least one merge (an
    empty list is dropped by the writer): one of two printable ASCII characters, whose merged form is not a
    token, so that llama.cpp falls back to the two characters' own tokens."""
    b2u = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([b2u[b] for b in range(256)])
    w.add_token_types([1] * 256)  # NORMAL
    w.add_token_merges(["q z"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _export_gguf(m: _Model, out: Path, force: bool, type: str | None, allow_lossy: bool) -> ExportReport:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("--to gguf needs the gguf package: pip install 'arbs[export]'") from e
    if m.is_hf:
        raise ConfigError(
            f"{_where(m.ckpt)} is a run of a Hugging Face {m.ckpt.meta['model'].get('model_type')} model; --to gguf "
            "writes the built-in byte model. Export it with --to hf (exact bf16), then llama.cpp's "
            "convert_hf_to_gguf.py --outtype bf16 (also exact)")
    cfg = _gpt_config(m, "gguf")
    float_run = m.ckpt.kind != "e1tm"
    prefs = type.split(",") if type is not None else []
    if float_run and any(t not in FLOAT_TYPES for t in prefs):
        raise ConfigError(f"{_where(m.ckpt)} is a float-baseline run ({m.fmt}): its weights are float, not ternary, "
                          f"so --type {type} cannot hold them; use --type f32 (exact), bf16 or f16")
    entries = gguf_tensors(cfg, m.weights)
    plan, problems = [], []
    for name, srcname, a in entries:
        if a.ndim == 1:
            plan.append((name, srcname, a, GGUF_TYPES["f32"], None))
            continue
        best, _ = _choose(a, float_run)
        if type is None:
            plan.append((name, srcname, a, best, None))
            continue
        t = GGUF_TYPES[prefs[-1]]
        for name_t in prefs[:-1]:
            if why_not(a, GGUF_TYPES[name_t]) is None:
                t = GGUF_TYPES[name_t]
                break
        r = why_not(a, t)
        if r is not None and (not allow_lossy or a.shape[1] % t.block):
            problems.append(f"  {name} (from {srcname}, {a.shape[0]}x{a.shape[1]}): {r}; exact: {best.name}")
        plan.append((name, srcname, a, t, r))
    if problems:
        shape_only = all("not a multiple" in p for p in problems)
        raise ConfigError(
            f"--type {type} cannot hold {len(problems)} tensor(s) of {_where(m.ckpt)} exactly:\n" + "\n".join(problems[:12])
            + ("\n  ..." if len(problems) > 12 else "")
            + ("\nOmit --type to give each tensor the smallest exact type, or list a fallback (--type "
               f"{type},q4_0)" if shape_only else
               "\nOmit --type to give each tensor the smallest exact type, or pass --allow-lossy to quantize anyway "
               "(the error of each tensor is reported)"))
    tmp = durable.tmp_sibling(out, "export")
    tensors = []
    try:
        w = gguf.GGUFWriter(os.fspath(tmp), "llama")
        w.add_name(Path(out).stem)
        w.add_context_length(cfg.context)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        w.add_layer_norm_rms_eps(RMS_EPS)
        w.add_rope_freq_base(ROPE_THETA)
        w.add_rope_dimension_count(cfg.head_size)
        w.add_vocab_size(cfg.vocab_size)
        add_byte_vocab(w)
        for name, srcname, a, t, reason in plan:
            a2 = a.reshape(1, -1) if a.ndim == 1 else a
            packed = _pack(a2, t)
            back = _dequant(packed, t).reshape(a2.shape)
            exact = np.array_equal(back.view(np.uint32), np.ascontiguousarray(a2, np.float32).view(np.uint32))
            if reason is None and not exact:
                raise AssertionError(f"{name}: {t.name} did not round-trip though it should be exact")
            diff = back.astype(np.float64) - a2
            norm = float(np.linalg.norm(a2))
            rel = float(np.linalg.norm(diff) / norm) if norm else 0.0
            tensors.append(TensorExport(name, srcname, tuple(a.shape), t.name, exact, 0.0 if exact else rel,
                                        0.0 if exact else float(np.abs(diff).max()), reason or ""))
            raw = t.ggml
            if a.ndim == 1:
                w.add_tensor(name, np.ascontiguousarray(a, np.float32))
            else:
                w.add_tensor(name, packed, raw_dtype=getattr(gguf.GGMLQuantizationType, raw))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        nbytes = tmp.stat().st_size
        durable.place(tmp, out, force)
    except BaseException:
        durable.discard(tmp)
        raise
    lossy = [t for t in tensors if not t.exact]
    if lossy:
        m.notes.append(f"LOSSY: {len(lossy)} tensor(s) are not exact (--allow-lossy); see rel_l2 per tensor")
    return _report(m, "gguf", out, nbytes, tensors=tuple(tensors), dtype=type)


__all__ = ["ExportReport", "GGUF_TYPES", "TARGETS", "TensorExport", "byte_tokenizer", "bytes_to_unicode", "export",
           "gguf_tensors", "llama_config", "llama_state", "load_model", "permute_rope_rows", "why_not"]
