"""Hugging Face causal LMs from a local directory, made ready for E1TM: read, check, load, fold, wrap.

A *source* is a local directory that ``save_pretrained`` wrote: ``config.json``, the weights as
``model.safetensors`` or shards listed in ``model.safetensors.index.json`` (float32, bfloat16 or float16),
and, for training, the fast tokenizer's ``tokenizer.json``. Nothing is downloaded: transformers is called
with ``local_files_only=True``. Supported families (:data:`SUPPORTED`): Llama, Mistral, Qwen2 (its q/k/v
biases included) and GPT-2.

Integer only: folding
---------------------
E1TM state is integer, so a norm's float gain cannot persist. Before ternarizing, :func:`fold_` moves every
norm gain ``g`` into the linear layers that read the norm's output: ``W (g * n(x)) = (W diag(g)) n(x)``, so
``W' = W * g`` (per input column) is exact in real arithmetic; the norm becomes a gainless module with no
parameters (:class:`RMSNorm`, or ``nn.LayerNorm(elementwise_affine=False)``). A LayerNorm bias ``beta``
(GPT-2) folds into the reading layer's bias: ``b' = b + W beta``. GPT-2's ``Conv1D`` layers become
``nn.Linear`` first (the weight transposed), so that ``arbs.nn.ternarize_`` converts them.

The final norm feeds the output head. When the head is tied to the token embedding (GPT-2, small Llamas),
folding the gain into it would change the embedding too; ``head="keep"`` (the default) keeps the tie and
leaves the final norm with its float gain (and bias): ``d_model`` (GPT-2: ``2 * d_model``) floats;
``head="untie"`` folds it into a new, separate head (one more ``vocab x d_model`` E1TM tensor, no float).

What stays float
----------------
Biases (Qwen2's q/k/v, every GPT-2 linear, the biases a LayerNorm fold creates) and a kept final norm: the
parameters :func:`float_state` lists. They are tiny (Qwen2-0.5B: 27,648 of 494M weights, 0.006 %; GPT-2
small: 82,944 + 1,536 of 124M, 0.07 %), E1TM has no integer form for an additive vector, and they are
**frozen**: never trained, so the float part of a run never changes. Every checkpoint holds them apart
from the integer state (``Checkpoint.float_params``, the ``_float`` group), and its meta holds the HF
config and the tokenizer (``meta["hf"]``), so that eval, generate, fuse and resume need nothing else.

The model arbs trains is :class:`CausalLM`: the HF module behind the interface of the built-in GPT
(``forward(idx, targets) -> (logits, loss)``, ``stream``). Checkpoint tensor names are the HF parameter
names prefixed by ``hf.``.

transformers and tokenizers are the optional extra ``arbs[hf]``; they are imported on first use only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

# model_type (config.json) -> the class arbs loads. Each needs a fold plan in _plan.
SUPPORTED: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DEFAULT_CONTEXT = 256  # tokens per sequence unless --context says, capped by the model's positions
HEADS = ("keep", "untie")

CONFIG_MAX_BYTES = 4 << 20
INDEX_MAX_BYTES = 64 << 20
TOKENIZER_MAX_BYTES = 256 << 20
# Bytes per weight while a model is loaded, folded and converted: the float32 model (4), the E1TM training
# state (flip: T_packed 0.2 + flip_accum 1 + per-group E and corr_accum), and ops.convert's float temporaries.
BYTES_PER_WEIGHT = 8
# Element sizes of safetensors dtypes (the header names them).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def load_transformers():
    """The transformers module (progress bars off: library code never prints); ConfigError naming the extra
    when it is not installed."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("Hugging Face models need transformers and tokenizers: pip install 'arbs[hf]'") from e
    transformers.utils.logging.disable_progress_bar()  # library code never prints
    return transformers


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("Hugging Face tokenizers need the tokenizers package: pip install 'arbs[hf]'") from e
    return tokenizers


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _canonical(d) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------------------------------------
# the source directory, read without loading weights


def _read_bounded(p: Path, limit: int, what: str) -> bytes:
    try:
        size = p.stat().st_size
        if size > limit:
            raise ConfigError(f"{what} '{p}' is {size} bytes; more than the {limit} arbs reads")
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{p}': {e.strerror or e}") from e


def _read_json(p: Path, limit: int, what: str) -> dict:
    try:
        d = json.loads(_read_bounded(p, limit, what))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{p}' is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{what} '{p}' holds a JSON {type(d).__name__}, not an object")
    return d


def read_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a local HF model directory, checked: it exists and names a supported
    ``model_type``. ConfigError otherwise (the message says what a model directory holds)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model directory '{p}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"'{p}' is not a directory; a Hugging Face model is a directory holding {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE} (written by save_pretrained)")
    if not (p / CONFIG_FILE).is_file():
        raise ConfigError(f"'{p}' holds no {CONFIG_FILE}: it is not a Hugging Face model directory (one holds "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE} or {INDEX_FILE}, as save_pretrained writes them)")
    cfg = _read_json(p / CONFIG_FILE, CONFIG_MAX_BYTES, "model config")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise ConfigError(f"'{p / CONFIG_FILE}' has model_type {mt!r}, which arbs does not support; supported: "
                          f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    return cfg


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: ``model.safetensors``, or the shards its index lists."""
    p = Path(path)
    if (p / INDEX_FILE).is_file():
        index = _read_json(p / INDEX_FILE, INDEX_MAX_BYTES, "weight index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConfigError(f"'{p / INDEX_FILE}' has no weight_map; re-save the model with save_pretrained")
        names = sorted({str(v) for v in wm.values()})
        files = [p / n for n in names]
        bad = [n for n, f in zip(names, files) if Path(n).name != n or not f.is_file()]
        if bad:
            raise ConfigError(f"'{p / INDEX_FILE}' lists shard(s) {bad[:3]} that are not files in '{p}'")
        return files
    if (p / WEIGHTS_FILE).is_file():
        return [p / WEIGHTS_FILE]
    other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
    hint = (f" It holds {', '.join(other[:3])}: re-save with save_pretrained(dir, safe_serialization=True)."
            if other else "")
    raise ConfigError(f"'{p}' holds no {WEIGHTS_FILE} or {INDEX_FILE}; arbs reads safetensors weights.{hint}")


def safetensors_tensors(f: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every tensor in a safetensors file, read from its header (the
    ``safetensors`` library checks the header against the file) without loading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(f, framework="numpy") as h:
            slices = {k: h.get_slice(k) for k in h.keys()}
            return {k: (s.get_dtype(), list(s.get_shape())) for k, s in slices.items()}
    except OSError as e:
        raise ConfigError(f"cannot read '{f}': {e.strerror or e}") from e
    except SafetensorError as e:
        raise ConfigError(f"'{f}' is not a valid safetensors file: {e}") from e


@dataclass(frozen=True)
class Source:
    """A local HF model directory, read and checked without loading its weights."""

    path: Path
    config: dict  # config.json as written
    weight_files: tuple[Path, ...]
    n_weights: int  # elements in the safetensors files
    weight_dtypes: tuple[str, ...]  # safetensors dtypes seen (F32, BF16, F16, ...)
    tokenizer_json: bytes | None  # tokenizer.json as written, None if the directory has none

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.config)

    def default_context(self) -> int:
        return default_context(self.config)


def max_positions(config: dict) -> int | None:
    v = config.get("n_positions", config.get("max_position_embeddings"))
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def default_context(config: dict) -> int:
    """Tokens per training sequence when --context is not given: DEFAULT_CONTEXT, capped by the model's
    positions."""
    mp = max_positions(config)
    return min(DEFAULT_CONTEXT, mp) if mp else DEFAULT_CONTEXT


def read_source(path: str | os.PathLike, *, tokenizer: bool = True) -> Source:
    """Read and check a local HF model directory without loading its weights.

    Checks: the directory and its ``config.json`` exist, its ``model_type`` is supported, the safetensors
    weights are there (headers readable); with ``tokenizer=True`` a ``tokenizer.json`` must be there and
    its token ids must fit the embedding (``config.vocab_size`` rows; more rows than tokens is common
    padding and fine). Without, a tokenizer.json that is there is still read and checked.
    """
    p = Path(path)
    cfg = read_config(p)
    vocab = cfg.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(f"'{p / CONFIG_FILE}' has vocab_size {vocab!r}; expected a positive integer")
    files = weight_files(p)
    n, dtypes = 0, set()
    for f in files:
        for dtype, shape in safetensors_tensors(f).values():
            n += math.prod(shape)
            dtypes.add(dtype)
    tok = None
    tp = p / TOKENIZER_FILE
    if tp.is_file():
        tok = _read_bounded(tp, TOKENIZER_MAX_BYTES, "tokenizer")
        check_tokenizer(tok, vocab, where=str(tp))
    elif tokenizer:
        raise ConfigError(f"'{p}' holds no {TOKENIZER_FILE}; arbs tokenizes the training data with the model's "
                          f"own fast tokenizer (save it with tokenizer.save_pretrained(dir))")
    return Source(p, cfg, tuple(files), n, tuple(sorted(dtypes)), tok)


def load_tokenizer(json_bytes: bytes):
    """A ``tokenizers.Tokenizer`` from the bytes of a tokenizer.json."""
    try:
        return _tokenizers().Tokenizer.from_str(json_bytes.decode("utf-8"))
    except Exception as e:  # the Rust side raises its own Exception type
        raise ConfigError(f"cannot read the tokenizer: {e}") from e


def encoder(tok):
    """``encode(pieces: list[str]) -> list[list[int]]`` with ``tok`` and no special tokens added (the form
    ``arbs.data.tokenize_corpus`` takes)."""
    def encode(pieces: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)]

    return encode


def tokenizer_vocab(tok) -> int:
    """One more than the largest token id the tokenizer can emit (added tokens included)."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(ids) + 1 if ids else 0


def check_tokenizer(json_bytes: bytes, rows: int, *, where: str = TOKENIZER_FILE) -> None:
    """ConfigError unless every token id of the tokenizer indexes a row of an embedding with ``rows`` rows."""
    n = tokenizer_vocab(load_tokenizer(json_bytes))
    if n > rows:
        raise ConfigError(f"{where} emits token ids up to {n - 1}, but the model's embedding has {rows} rows "
                          f"(config vocab_size): this tokenizer does not belong to this model")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return None


def memory_needed(source: Source, *, batch_size: int = 1, context: int | None = None) -> int:
    """Bytes to load, fold, convert and train ``source``: BYTES_PER_WEIGHT per weight plus a lower bound
    on a step's float32 activations (16 values per layer per token per channel, the attention
    probabilities, the logits)."""
    c = source.config
    d = int(c.get("hidden_size", c.get("n_embd", 0)) or 0)
    layers = int(c.get("num_hidden_layers", c.get("n_layer", 0)) or 0)
    heads = int(c.get("num_attention_heads", c.get("n_head", 0)) or 0)
    t = context or source.default_context()
    per_layer = 16 * batch_size * t * d + batch_size * heads * t * t
    act = 4 * (layers * per_layer + 3 * batch_size * t * source.vocab_size)
    return BYTES_PER_WEIGHT * source.n_weights + act


def check_memory(source: Source, *, batch_size: int = 1, context: int | None = None) -> None:
    """ConfigError, before anything is loaded, when ``memory_needed`` exceeds this machine's memory."""
    need, have = memory_needed(source, batch_size=batch_size, context=context), physical_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"the model in '{source.path}' has {source.n_weights / 1e9:.2f}B weights; loading, folding and "
            f"converting it needs about {need / 2**30:.1f} GiB, and this machine has {have / 2**30:.1f} GiB. "
            "Use a smaller model, --batch-size or --context, or a machine with more memory")


# --------------------------------------------------------------------------------------------------------
# loading and folding


def hf_config(config: dict):
    """The transformers config object of a config.json dict, made deterministic for training: every
    dropout probability 0 (dropout would draw from torch's global RNG, and a resumed run must replay
    exactly), the cache off."""
    tf = load_transformers()
    d = dict(config)
    mt = d.pop("model_type")
    c = tf.AutoConfig.for_model(mt, **d)
    for k, v in c.to_dict().items():
        if ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v != 0.0:
            setattr(c, k, 0.0)
    c.use_cache = False
    return c


class RMSNorm(nn.Module):
    """RMSNorm without a gain (it was folded into the layers that read its output); computed as the HF
    Llama/Mistral/Qwen2 norm computes it (in float32, cast back)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, no gain"


def _is_rms(norm: nn.Module) -> bool:
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")


def _conv1d_to_linear_(model: nn.Module) -> int:
    """Replace GPT-2's transformers Conv1D (``y = x @ W + b``, W of shape (in, out)) by nn.Linear with W.T."""
    n = 0
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            w = m.weight.detach()
            lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w.t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.detach())
            _set(model, name, lin)
            n += 1
    return n


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _plan(model: nn.Module, model_type: str) -> tuple[list[tuple[str, tuple[str, ...]]], str, str]:
    """(norm -> the linear layers reading its output, for every block; the final norm; the head)."""
    if model_type in _LLAMA_LIKE:
        n = len(model.get_submodule("model.layers"))
        blocks = []
        for i in range(n):
            p = f"model.layers.{i}."
            blocks.append((p + "input_layernorm", tuple(p + f"self_attn.{k}_proj" for k in "qkv")))
            blocks.append((p + "post_attention_layernorm", (p + "mlp.gate_proj", p + "mlp.up_proj")))
        return blocks, "model.norm", "lm_head"
    if model_type == "gpt2":
        n = len(model.get_submodule("transformer.h"))
        blocks = []
        for i in range(n):
            p = f"transformer.h.{i}."
            blocks.append((p + "ln_1", (p + "attn.c_attn",)))
            blocks.append((p + "ln_2", (p + "mlp.c_fc",)))
        return blocks, "transformer.ln_f", "lm_head"
    raise ConfigError(f"no fold plan for model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")


def _norm_gain_bias(norm: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        return norm.weight.detach(), (norm.bias.detach() if norm.bias is not None else None)
    if _is_rms(norm) and isinstance(getattr(norm, "weight", None), torch.Tensor):
        return norm.weight.detach(), None
    raise ConfigError(f"{path} is a {type(norm).__name__}; arbs folds RMSNorm and LayerNorm gains only")


def _gainless(norm: nn.Module) -> nn.Module:
    if isinstance(norm, nn.LayerNorm):
        return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    return RMSNorm(norm.variance_epsilon)


def _fold_into(lin: nn.Linear, g: torch.Tensor, b: torch.Tensor | None) -> None:
    """``lin(g * n + b) == lin'(n)``: W' = W * g (per input column), bias' = bias + W @ b."""
    w = lin.weight.detach()
    if b is not None:
        extra = w.double() @ b.double()
        old = lin.bias.detach().double() if lin.bias is not None else 0.0
        lin.bias = nn.Parameter((old + extra).to(w.dtype))
    lin.weight.mul_(g.to(w.dtype)[None, :])


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_` did."""

    folded: tuple[tuple[str, tuple[str, ...]], ...]  # norm -> the layers its gain went into
    head: str  # "folded" (untied head), "untied" (a new head), "kept" (tied head: final norm kept float)
    conv1d: int  # GPT-2 Conv1D layers made nn.Linear


def fold_(model: nn.Module, model_type: str, *, head: str = "keep") -> FoldReport:
    """Fold every norm gain (and LayerNorm bias) of an HF causal LM into the linear layers reading the
    norm's output, in place, in float; the norms become gainless modules without parameters.

    ``head`` decides the final norm when the output head is tied to the token embedding: "keep" leaves
    the tie and the final norm (its gain, and bias, stay float); "untie" gives the model a new head
    ``W_emb * g`` (bias ``W_emb @ beta`` for a LayerNorm) and makes the final norm gainless. An untied
    head always takes the fold. Applied to a model built from a config (random weights) it makes the same
    structure, which is how a run's model is rebuilt before its state is loaded.
    """
    if head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS}; got {head!r}")
    with torch.no_grad():
        conv = _conv1d_to_linear_(model) if model_type == "gpt2" else 0
        blocks, final, head_path = _plan(model, model_type)
        folded = []
        for norm_path, readers in blocks:
            norm = model.get_submodule(norm_path)
            g, b = _norm_gain_bias(norm, norm_path)
            for r in readers:
                lin = model.get_submodule(r)
                if not isinstance(lin, nn.Linear):
                    raise ConfigError(f"{r} is a {type(lin).__name__}; arbs folds into nn.Linear only")
                _fold_into(lin, g, b)
            _set(model, norm_path, _gainless(norm))
            folded.append((norm_path, readers))
        lm_head = model.get_submodule(head_path)
        emb = model.get_input_embeddings()
        tied = lm_head.weight is emb.weight
        norm = model.get_submodule(final)
        if tied and head == "keep":
            how = "kept"
        else:
            g, b = _norm_gain_bias(norm, final)
            if tied:  # a new head, owning a copy of the embedding
                new = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=lm_head.bias is not None)
                new.weight.copy_(emb.weight.detach())
                if lm_head.bias is not None:
                    new.bias.copy_(lm_head.bias.detach())
                _set(model, head_path, new)
                lm_head = new
                model.config.tie_word_embeddings = False
                how = "untied"
            else:
                how = "folded"
            _fold_into(lm_head, g, b)
            _set(model, final, _gainless(norm))
            folded.append((final, (head_path,)))
    return FoldReport(tuple(folded), how, conv)


def load_pretrained(source: Source) -> nn.Module:
    """The HF model of ``source`` with its weights, in float32 (bf16/fp16 widened exactly), eval mode,
    dropout 0, from the local directory only."""
    tf = load_transformers()
    kw = {"dtype": torch.float32} if _version(tf) >= (4, 56) else {"torch_dtype": torch.float32}
    if hasattr(tf.PreTrainedModel, "set_use_kernels"):  # transformers 5 would swap in hub kernels by default
        kw["use_kernels"] = False
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(source.path), config=hf_config(source.config), local_files_only=True, attn_implementation="sdpa",
            **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"transformers could not load the model in '{source.path}': {e}") from e
    return model.float().eval()


def _version(tf) -> tuple[int, int]:
    try:
        major, minor = tf.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # pragma: no cover
        return (0, 0)


def from_config(config: dict) -> nn.Module:
    """The HF model of a config.json dict with freshly initialized float32 weights (torch's RNG)."""
    tf = load_transformers()
    return tf.AutoModelForCausalLM.from_config(hf_config(config), attn_implementation="sdpa").float()


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that stay float: every parameter that is not the weight of an nn.Linear or
    nn.Embedding (before ternarizing), i.e. every parameter left after ``arbs.nn.ternarize_``."""
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    return {n: p for n, p in model.named_parameters() if id(p) not in weights}


def load_floats_(model: nn.Module, floats: dict[str, np.ndarray]) -> None:
    """Copy a checkpoint's float part (``Checkpoint.float_params``) into ``model``'s float parameters
    (:func:`float_state`; the names must match exactly)."""
    own = float_state(model)
    if set(own) != set(floats):
        raise ConfigError(f"the checkpoint's float parameters do not match the model: missing "
                          f"{sorted(set(own) - set(floats))[:5]}, unexpected {sorted(set(floats) - set(own))[:5]}")
    with torch.no_grad():
        for n, p in own.items():
            a = np.asarray(floats[n])
            if tuple(p.shape) != a.shape:
                raise ConfigError(f"float parameter {n!r} has shape {a.shape}; the model needs {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))


# --------------------------------------------------------------------------------------------------------
# the model arbs trains


class CausalLM(nn.Module):
    """An HF causal LM behind the built-in GPT's interface: ``forward(idx, targets) -> (logits, loss)``
    (mean cross-entropy in nats per token) and ``stream``; ``context`` is the longest sequence it takes."""

    def __init__(self, hf: nn.Module, context: int) -> None:
        super().__init__()
        self.hf = hf
        self.context = int(context)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if idx.dim() != 2:
            raise ConfigError(f"CausalLM.forward: idx must have shape (batch, time); got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.context:
            raise ConfigError(f"CausalLM.forward: sequence length {T} exceeds the context {self.context}")
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None):
        """Yield (B, 1) sampled tokens one at a time; the model sees the last ``context`` tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.context:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt


PREFIX = "hf."  # CausalLM's name for the HF module: checkpoint tensor names are "hf." + the HF names


def load_folded(source: Source, *, context: int | None = None, head: str = "keep") -> tuple[CausalLM, FoldReport]:
    """Load ``source``'s weights (float32), fold its norms (:func:`fold_`) and wrap it: the float model a
    run ternarizes."""
    model = load_pretrained(source)
    report = fold_(model, source.model_type, head=head)
    for p in model.parameters():
        p.requires_grad_(False)
    return CausalLM(model, context or source.default_context()), report


# --------------------------------------------------------------------------------------------------------
# what a run records: meta["model"] (its identity) and meta["hf"] (what rebuilds it)


def tokenizer_record(json_bytes: bytes | None) -> dict | None:
    if json_bytes is None:
        return None
    return {"sha256": sha256_bytes(json_bytes), "bytes": len(json_bytes),
            "zlib_b64": base64.b64encode(zlib.compress(json_bytes, 9)).decode("ascii")}


def tokenizer_bytes(record: dict) -> bytes:
    """The tokenizer.json a run recorded (checked against its sha256)."""
    tok = record.get("tokenizer") if isinstance(record, dict) else None
    if not tok:
        raise ConfigError("this run recorded no tokenizer (its model directory had no tokenizer.json)")
    try:
        raw = zlib.decompress(base64.b64decode(tok["zlib_b64"], validate=True), bufsize=int(tok["bytes"]))
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise ConfigError(f"the run's tokenizer record is damaged: {e}") from e
    if sha256_bytes(raw) != tok.get("sha256"):
        raise ConfigError("the run's tokenizer does not match its recorded sha256")
    return raw


def run_record(source: Source, *, context: int | None = None, head: str = "keep") -> tuple[dict, dict]:
    """(meta["model"], meta["hf"]) of a run of ``source``: its identity (model type, context, the sha256 of
    its config and tokenizer) and what rebuilds it without the source (config.json, the tokenizer). The
    float part is not here: checkpoints hold it in ``Checkpoint.float_params``."""
    ctx = int(context or source.default_context())
    mp = source.max_positions
    if mp is not None and ctx > mp:
        raise ConfigError(f"--context {ctx} exceeds the model's {mp} positions")
    tok = tokenizer_record(source.tokenizer_json)
    model = {
        "kind": "hf",
        "model_type": source.model_type,
        "context": ctx,
        "vocab_size": source.vocab_size,
        "config_sha256": sha256_bytes(_canonical(source.config)),
        "tokenizer_sha256": tok["sha256"] if tok else None,
        "head": head,
    }
    hf = {"source": str(source.path.resolve()), "config": source.config, "head": head, "tokenizer": tok,
          "weights": source.n_weights, "weight_dtypes": list(source.weight_dtypes)}
    return model, hf


def is_hf_meta(meta: dict) -> bool:
    m = meta.get("model") if isinstance(meta, dict) else None
    return isinstance(m, dict) and m.get("kind") == "hf"


def from_record(model_meta: dict, record: dict) -> CausalLM:
    """The float model a run recorded, rebuilt from its HF config: random weights, folded so that the
    structure is the run's, float parameters frozen. Its weights and float part come from a checkpoint."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError("the checkpoint's meta has no 'hf' record (config) to rebuild its model from")
    cfg = record["config"]
    if cfg.get("model_type") not in SUPPORTED:
        raise ConfigError(f"the run's model_type {cfg.get('model_type')!r} is not supported by this arbs")
    model = from_config(cfg)
    fold_(model, cfg["model_type"], head=record.get("head", "keep"))
    for p in model.parameters():
        p.requires_grad_(False)
    return CausalLM(model, model_meta["context"])


def load_weights_(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load float weights (checkpoint tensor names, e.g. fused W_eff) into the Linear/Embedding weights of
    a float model; a tied weight is named once, by its first module."""
    targets = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and all(m.weight is not t for t in targets.values()):
            targets[f"{n}.weight"] = m.weight
    if set(targets) != set(weights):
        raise ConfigError(f"checkpoint tensors do not match the model: missing {sorted(set(targets) - set(weights))[:5]}, "
                          f"unexpected {sorted(set(weights) - set(targets))[:5]}")
    with torch.no_grad():
        for n, p in targets.items():
            p.copy_(torch.from_numpy(np.asarray(weights[n])).reshape(p.shape))
