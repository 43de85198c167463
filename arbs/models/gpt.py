"""The built-in byte-level GPT decoder, built so that every weight can become ternary integer state.

Design constraints (why it looks the way it does):

* The only parameters are ``nn.Linear`` weights and one :class:`Embedding` weight. No biases, no norm gains,
  no learned position table: converting every Linear/Embedding to ternary integer state must leave nothing
  float and persistent. Positions come from rotary embeddings (RoPE) computed on the fly; norms are RMSNorm
  without gain (``F.rms_norm`` with no weight).
* The output head is tied to the token embedding and goes through ``self.wte.attend(h)``, never through
  ``.weight``: other code swaps in ternary modules that keep the ``forward``/``attend`` interface.
* Logits are ``attend(h)`` unscaled. The final norm has no gain, so ``h`` has unit RMS and the logit range
  is set by the embedding's magnitude alone (|logit| <= sqrt(d) * ||w_row||); at init that is a
  near-uniform distribution, loss ~ ln(256).
* Init is GPT-2's, scaled to the width: std = 0.02 * sqrt(768 / d_model) (GPT-2's 0.02 belongs to its
  d_model = 768; ``init_std``). Without norm gains nothing else sets the scale of attention logits and
  activations (measured in docs/research/training.md; base keeps GPT-2's 0.02).

Pre-norm blocks: ``x + attn(norm(x))``, ``x + mlp(norm(x))``; final norm before the head. Shape comments use
B (batch), T (time), C (d_model), nh (heads), hs (head size), V (vocab).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .config import DEFAULT_PRESET, PRESETS, GPTConfig, get_preset, init_std

__all__ = ["DEFAULT_PRESET", "GPT", "PRESETS", "Embedding", "GPTConfig", "count_weights", "get_preset", "init_std"]

ROPE_BASE = 10000.0
NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------
# modules


class Embedding(nn.Embedding):
    """Token embedding that doubles as the tied output head.

    ``forward(idx)`` looks rows up; ``attend(x)`` scores ``x`` against every row (``x @ weight.T``).
    Replacements (e.g. ternary embeddings) subclass this and override both; the model never reads
    ``.weight`` itself.
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., C) -> (..., V)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)  # no gain: nothing float to persist


def rope_cos_sin(T: int, head_size: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary position embedding, each (T, head_size // 2); computed, never stored."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (..., hs) by position-dependent angles (GPT-NeoX layout).

    cos and sin (from :func:`rope_cos_sin`) must broadcast against x's (..., hs/2) halves, e.g. (T, 1, hs/2)
    for x of shape (B, T, nh, hs).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # residual projection

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qk, v = self.qkv(x).split((2 * C, C), dim=2)  # (B, T, 2C), (B, T, C)
        # rotate q and k in one op: half the elementwise kernels, which dominate at small d_model on CPU
        qk = apply_rope(qk.view(B, T, 2 * nh, hs), cos[:, None, :], sin[:, None, :])  # (B, T, 2nh, hs)
        q, k = qk.transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) each
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """``proj(silu(gate) * up)`` with gate and up the two halves of ``fc``'s output (swiglu, Llama's), or
    ``proj(gelu(fc(x)))`` (gelu). H is ``cfg.hidden_size``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        H = cfg.hidden_size
        self.fc = nn.Linear(cfg.d_model, 2 * H if self.gated else H, bias=False)  # swiglu: rows [gate; up]
        self.proj = nn.Linear(H, cfg.d_model, bias=False)  # residual projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, H) each
            return self.proj(F.silu(gate) * up)  # (B, T, H) -> (B, T, C)
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C) -> (B, T, H) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_norm(x), cos, sin)
        return x + self.mlp(_norm(x))


class GPT(nn.Module):
    """Byte-level GPT decoder: tied :class:`Embedding` -> RoPE pre-norm blocks -> RMSNorm -> ``wte.attend``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"GPT needs a GPTConfig (see arbs.models.gpt.PRESETS); got {type(config).__name__}")
        self.config = config
        self.wte = Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init at this width: N(0, std) everywhere (std = init_std(d_model)); residual projections
        N(0, std / sqrt(2 * n_layer))."""
        std = init_std(self.config.d_model)
        nn.init.normal_(self.wte.weight, mean=0.0, std=std)
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.mlp.fc):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
            for lin in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(lin.weight, mean=0.0, std=resid_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T); and mean cross-entropy in nats if targets (B, T) given."""
        if idx.dim() != 2:
            raise ConfigError(f"GPT.forward: idx must have shape (batch, time); got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.context:
            raise ConfigError(
                f"GPT.forward: sequence length {T} exceeds the model context {self.config.context}; "
                f"crop the input or build the model with a larger context"
            )
        x = self.wte(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(T, self.config.head_size, device=x.device, dtype=x.dtype)  # (T, hs/2) each
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.wte.attend(_norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ConfigError(
                    f"GPT.forward: targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}"
                )
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        The model sees at most the last ``config.context`` tokens. ``temperature == 0`` is greedy (argmax,
        deterministic); otherwise tokens are drawn from softmax(logits / temperature) with ``generator``.
        The caller chooses train/eval mode (the model has no dropout, so both behave the same).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ConfigError(f"generate: temperature must be a finite number >= 0; got {temperature!r}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ConfigError(
                f"generate: idx must have shape (batch, time) with time >= 1; got shape {tuple(idx.shape)}"
            )
        for nxt in self.stream(idx, max_new_tokens, temperature, generator):
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None):
        """Yield the (B, 1) tokens :meth:`generate` appends, one at a time, as they are sampled."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.context :])
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt


def count_weights(model: nn.Module) -> int:
    """Number of weights in the Linear and Embedding layers of ``model``.

    Counted from each layer's shape (``in_features * out_features``, ``num_embeddings * embedding_dim``), so
    replacement modules that keep that interface but store weights as integer buffers count the same. A
    module that matches is counted once and not descended into; the tied head adds nothing.
    """
    def walk(m: nn.Module) -> int:
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            return int(m.in_features) * int(m.out_features)
        if hasattr(m, "num_embeddings") and hasattr(m, "embedding_dim"):
            return int(m.num_embeddings) * int(m.embedding_dim)
        return sum(walk(c) for c in m.children())

    return walk(model)
