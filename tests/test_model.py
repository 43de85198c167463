"""The byte-level GPT: presets, shapes, causality, trainability, generation, swappable Embedding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arbs.errors import ConfigError
from arbs.models.gpt import GPT, PRESETS, Embedding, GPTConfig, count_weights, get_preset

SMALL = GPTConfig(n_layer=2, n_head=2, d_model=32, context=16)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(SMALL)


def _weights(cfg: GPTConfig) -> int:
    d, h = cfg.d_model, cfg.hidden_size
    mlp = 3 * d * h if cfg.mlp == "swiglu" else 2 * d * h
    return cfg.vocab_size * d + cfg.n_layer * (3 * d * d + d * d + mlp)


def test_mlp_kinds_and_old_configs():
    """swiglu is the default; a config saved without 'mlp' (before the key existed) reads back as gelu; an
    unknown kind is refused by name."""
    assert SMALL.mlp == "swiglu" and SMALL.hidden_size == 96  # 2/3 * 4 * 32 = 85.3 -> next multiple of 32
    assert get_preset("base").hidden_size == 2048 and get_preset("small").hidden_size == 768  # 256-blocks
    old = {k: v for k, v in SMALL.to_dict().items() if k != "mlp"}
    g = GPTConfig.from_dict(old)
    assert g.mlp == "gelu" and g.hidden_size == 128
    assert GPTConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="mlp must be one of swiglu, gelu"):
        GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, mlp="relu")
    x = torch.randn(2, 3, 32)
    for cfg in (SMALL, g):
        torch.manual_seed(0)
        m = GPT(cfg).blocks[0].mlp
        h = m.fc(x)
        want = (m.proj(F.silu(h[..., :96]) * h[..., 96:]) if cfg.mlp == "swiglu" else m.proj(F.gelu(h)))
        torch.testing.assert_close(m(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_gelu_presets_keep_their_shape(name):
    """Runs made before swiglu keep building the model they were trained with."""
    cfg = GPTConfig.from_dict({k: v for k, v in get_preset(name).to_dict().items() if k != "mlp"})
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.blocks[0].mlp.fc.weight.shape == (4 * cfg.d_model, cfg.d_model)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # shapes only: base has 85M weights
        m = GPT(cfg)
    n = count_weights(m)
    assert n == _weights(cfg) == sum(p.numel() for p in m.parameters())
    lo, hi = {"tiny": (0.4e6, 1.0e6), "small": (3e6, 7e6), "base": (75e6, 95e6)}[name]
    assert lo <= n <= hi


def test_unknown_preset_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown model preset 'tinny'.*tiny, small, base.*Did you mean 'tiny'"):
        get_preset("tinny")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_layer=0), "n_layer"),
        (dict(d_model=30, n_head=4), "not divisible"),
        (dict(d_model=24, n_head=8), "odd"),
        (dict(context=-1), "context"),
        (dict(n_head=2.0), "n_head"),
    ],
)
def test_config_validation(kw, msg):
    args = dict(n_layer=2, n_head=2, d_model=32, context=16) | kw
    with pytest.raises(ConfigError, match=msg):
        GPTConfig(**args)


def test_config_is_frozen_kw_only_and_roundtrips():
    with pytest.raises(TypeError):
        GPTConfig(2, 2, 32, 16)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        SMALL.n_layer = 3  # type: ignore[misc]
    assert GPTConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="unknown keys"):
        GPTConfig.from_dict(SMALL.to_dict() | {"dropout": 0.1})


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    m = GPT(cfg)
    x = torch.randint(0, 256, (4, cfg.context))
    y = torch.randint(0, 256, (4, cfg.context))
    logits, loss = m(x, y)
    assert logits.shape == (4, cfg.context, 256) and loss.shape == ()
    assert abs(loss.item() - math.log(256)) < 0.3
    logits2, none = m(x[:, :5])
    assert logits2.shape == (4, 5, 256) and none is None


def test_only_linear_and_embedding_parameters(model):
    owners = {}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            owners[id(p)] = (type(mod), name)
    assert len(owners) == len(list(model.parameters())) == 1 + 4 * SMALL.n_layer
    for cls, name in owners.values():
        assert name == "weight" and (cls is nn.Linear or cls is Embedding)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            assert mod.bias is None
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("preset, std", [("tiny", 0.02 * math.sqrt(6)), ("base", 0.02)])
def test_init_scales(preset, std):
    """GPT-2's 0.02 at d_model 768, scaled by 1/sqrt(d_model): tiny (128) gets 0.049."""
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    cfg = GPTConfig(**(dataclasses.asdict(cfg) | {"n_layer": 1}))  # one block is enough to look at
    m = GPT(cfg)
    assert abs(m.wte.weight.std().item() - std) < 0.05 * std
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - std) < 0.05 * std
    resid = std / math.sqrt(2 * cfg.n_layer)
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - resid) < 0.05 * resid


def test_causal(model):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, SMALL.context))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_position_matters(model):
    # RoPE, not a bag of tokens: the same token at the last position sees a different prefix order
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(torch.tensor([[2, 1, 3, 4]]))
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_adamw_reduces_loss(model):
    torch.manual_seed(2)
    x = torch.randint(0, 256, (4, SMALL.context))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_forward_rejects_too_long(model):
    with pytest.raises(ConfigError, match="exceeds the model context 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_generate_length_and_greedy(model):
    prompt = torch.tensor([[104, 105], [10, 32]])
    n = SMALL.context + 5  # longer than the context: exercises the crop
    a = model.generate(prompt, n, temperature=0)
    b = model.generate(prompt, n, temperature=0)
    assert a.shape == (2, 2 + n) and torch.equal(a, b) and torch.equal(a[:, :2], prompt)
    assert model.generate(prompt, 0).shape == (2, 2)


def test_generate_sampling_uses_generator(model):
    prompt = torch.tensor([[1, 2, 3]])
    s1 = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s2 = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and int(s1.min()) >= 0 and int(s1.max()) < 256
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)


class _HalvedEmbedding(Embedding):
    """A stand-in for a ternary embedding: stores weight/2 in a buffer and doubles it on use."""

    def __init__(self, src: Embedding) -> None:
        super().__init__(src.num_embeddings, src.embedding_dim)
        del self.weight
        self.register_buffer("w_half", src.weight.detach() / 2)
        self.attend_calls = 0

    def forward(self, idx):
        return F.embedding(idx, self.w_half * 2)

    def attend(self, x):
        self.attend_calls += 1
        return F.linear(x, self.w_half * 2)


def test_swapped_embedding_used_via_attend(model):
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        ref, _ = model(x)
        model.wte = _HalvedEmbedding(model.wte)
        out, _ = model(x)
    assert model.wte.attend_calls == 1
    torch.testing.assert_close(out, ref)
    assert count_weights(model) == _weights(SMALL)
    assert model.generate(x[:, :3], 4, temperature=0).shape == (2, 7)
