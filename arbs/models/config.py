"""The shape of the built-in byte GPT (GPTConfig) and its presets: plain dataclasses, no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import formats
from ..errors import ConfigError


MLP_KINDS = ("swiglu", "gelu")


def init_std(d_model: int) -> float:
    """Std of the weight init: GPT-2's 0.02 at its width 768, scaled as 1/sqrt(d_model)."""
    return 0.02 * math.sqrt(768 / d_model)


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a byte-level GPT. Frozen and keyword-only; validated on construction.

    Attributes
    ----------
    vocab_size : int
        Token count; 256 for bytes.
    n_layer, n_head, d_model : int
        Blocks, attention heads, residual width. ``d_model % n_head == 0`` and the head size
        ``d_model // n_head`` must be even (RoPE rotates pairs of channels).
    context : int
        Longest sequence the model accepts (RoPE has no table, but training sets the useful length).
    mlp_ratio : int
        Sets the MLP hidden width (see :attr:`hidden_size`).
    mlp : str
        ``"swiglu"`` (the default: Llama's gated MLP, ``proj(silu(gate) * up)``, so the model is a standard
        Llama that transformers and llama.cpp run) or ``"gelu"`` (``proj(gelu(fc(x)))``, the MLP of runs made
        before arbs 0.x; a checkpoint whose config lacks the key was trained with it).
    """

    vocab_size: int = 256
    n_layer: int
    n_head: int
    d_model: int
    context: int
    mlp_ratio: int = 4
    mlp: str = "swiglu"

    def __post_init__(self) -> None:
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"GPTConfig.mlp must be one of {', '.join(MLP_KINDS)}; got {self.mlp!r}")
        for f in dataclasses.fields(self):
            if f.name == "mlp":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"GPTConfig.{f.name} must be a positive int; got {v!r}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"choose n_head dividing d_model (e.g. {_divisor_hint(self.d_model, self.n_head)})"
            )
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"GPTConfig: head size d_model/n_head = {self.d_model // self.n_head} is odd; RoPE needs an "
                f"even head size: change d_model or n_head"
            )

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_size(self) -> int:
        """MLP hidden width: ``mlp_ratio * d_model`` for gelu; for swiglu two thirds of that (three matrices
        instead of two: about the same weight count), rounded up as Llama does: to a multiple of 256 where
        ``d_model`` is one (every weight row then fills whole 256-weight blocks, as GGUF's TQ1_0/TQ2_0 need),
        else of 32."""
        if self.mlp == "gelu":
            return self.mlp_ratio * self.d_model
        multiple = 256 if self.d_model % 256 == 0 else 32
        return -(-2 * self.mlp_ratio * self.d_model // 3 // multiple) * multiple

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for checkpoint attrs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer or foreign config). A config
        without ``mlp`` was written before the key existed, by a model with the gelu MLP."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"GPTConfig: unknown keys {unknown}; known keys: {sorted(names)}")
        return cls(**{"mlp": "gelu", **d})


def _divisor_hint(d_model: int, n_head: int) -> int:
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(divisors, key=lambda h: abs(h - n_head)) if divisors else 1


PRESETS: dict[str, GPTConfig] = {
    # CPU default: 0.82M weights.
    "tiny": GPTConfig(n_layer=4, n_head=4, d_model=128, context=128),
    # 4.8M weights; a CPU model for patient runs, or a quick GPU one.
    "small": GPTConfig(n_layer=6, n_head=4, d_model=256, context=256),
    # GPU: 85.1M weights (GPT-2 small's trunk with a 256-byte vocabulary).
    "base": GPTConfig(n_layer=12, n_head=12, d_model=768, context=512),
}
DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> GPTConfig:
    """The GPTConfig of a preset name; ConfigError listing the presets for an unknown one."""
    return formats.lookup(PRESETS, name, "model preset", "presets")
