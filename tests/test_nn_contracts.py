"""arbs.nn keeps torch's contracts: ``.weight`` reads, MultiheadAttention and nn.Transformer*, bare layers,
tied Parameters, torch.compile without graph breaks, and the eval-mode W_eff cache."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arbs import nn as anx
from arbs import ops


def _arrays(mod):
    return {k: v.copy() for k, v in mod.state_arrays().items()}


def _assert_state_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n][1][k], b[n][1][k]) for n in a for k in a[n][1])


def _w_eff(mod) -> torch.Tensor:
    return torch.from_numpy(ops.materialize(mod.state_arrays(), mod.shape, mod.clock.scheme, mod.clock.step_counter))


def _expected_after_vote(mod, grad):
    state = _arrays(mod)
    ops.vote(state, np.asarray(grad, np.float32), mod.shape, mod.clock.scheme)
    return state


# -- .weight -------------------------------------------------------------------------------------------------
class _LM(nn.Module):
    """The transformers layout: an input embedding and an lm_head that reads it through .weight-free forward."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, idx):
        return self.lm_head(self.embed_tokens(idx))


def test_weight_reads_give_w_eff_and_assigning_raises():
    torch.manual_seed(0)
    model = anx.ternarize_(_LM(), "E1TM8", "flip")
    emb, head = model.get_input_embeddings(), model.lm_head
    for m, shape in ((emb, (40, 16)), (head, (40, 16))):
        w = m.weight
        assert w.shape == shape and w.dtype == torch.float32 and w.device == m.T_packed.device
        assert not isinstance(w, nn.Parameter) and not w.requires_grad
        torch.testing.assert_close(w, _w_eff(m), rtol=0, atol=0)
        assert m.weight is not w, "each read is a new tensor"
        w.zero_()  # writing into a read changes nothing
        torch.testing.assert_close(m.weight, _w_eff(m), rtol=0, atol=0)
        for value in (nn.Parameter(torch.zeros(shape)), torch.zeros(shape)):
            with pytest.raises(AttributeError, match=r"\.weight is read-only"):
                m.weight = value
    assert not list(model.parameters())
    assert model.get_input_embeddings().weight.shape == (40, 16) and model.lm_head.weight.device.type == "cpu"


def test_weight_follows_training():
    torch.manual_seed(1)
    lin = anx.ternarize_(nn.Linear(12, 8, bias=False), "E1TM4", "flip", K=1, theta=1)
    before = lin.weight
    for _ in range(3):
        lin(torch.randn(5, 12)).pow(2).sum().backward()
        anx.step(lin)
    assert not torch.equal(lin.weight, before)
    torch.testing.assert_close(lin.weight, _w_eff(lin), rtol=0, atol=0)


# -- bare layers ---------------------------------------------------------------------------------------------
def test_bare_linear_and_embedding_are_converted_and_returned():
    torch.manual_seed(2)
    src = nn.Linear(4, 4)
    lin = anx.ternarize_(src, "E1TM4", "carry")
    assert isinstance(lin, anx.E1TMLinear) and lin is not src
    assert [n for n, _ in lin.named_modules()] == [""], "no child with an empty name"
    assert lin.bias is src.bias, "the bias stays the user's Parameter"
    assert anx.model_clock(lin).step_counter == 0 and list(anx.tensor_states(lin)) == ["weight"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(lin(x), x @ _w_eff(lin).t() + src.bias)
    lin(x).sum().backward()
    assert anx.step(lin) == 1

    emb = anx.ternarize_(nn.Embedding(10, 6), "E1TM6", "flip")
    assert isinstance(emb, anx.E1TMEmbedding) and emb.weight.shape == (10, 6)
    idx = torch.tensor([[1, 2, 9]])
    torch.testing.assert_close(emb(idx), _w_eff(emb)[idx])
    emb(idx).sum().backward()
    assert anx.step(emb) == 1

    model = nn.Sequential(nn.Linear(4, 4))
    assert anx.ternarize_(model, "E1TM4") is model, "a container is changed in place and returned"


def test_tensor_states_round_trip_for_a_bare_layer():
    lin = anx.ternarize_(nn.Linear(8, 4, bias=False), "E1TM4", "flip")
    states = {n: a for n, (_, a) in anx.tensor_states(lin).items()}
    other = anx.ternarize_(nn.Linear(8, 4, bias=False), "E1TM4", "flip")
    anx.load_tensor_states(other, states, 5)
    torch.testing.assert_close(other.weight, lin.weight, rtol=0, atol=0)
    assert anx.model_clock(other).step_counter == 5


# -- MultiheadAttention, nn.Transformer* ---------------------------------------------------------------------
def _float_twin_mha(mha: anx.E1TMMultiheadAttention, src: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A float nn.MultiheadAttention with the E1TM module's W_eff and the same float biases."""
    twin = copy.deepcopy(src)
    with torch.no_grad():
        twin.in_proj_weight.copy_(mha.in_proj_weight)
        twin.out_proj.weight.copy_(mha.out_proj.weight)
    return twin


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_votes_on_the_true_gradients(batch_first):
    torch.manual_seed(3)
    src = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    keep = copy.deepcopy(src)
    mha = anx.ternarize_(src, "E1TM8", "carry")
    assert isinstance(mha, anx.E1TMMultiheadAttention) and isinstance(mha, nn.MultiheadAttention)
    assert list(anx.tensor_states(mha)) == ["in_proj.weight", "out_proj.weight"]
    assert mha.in_proj_weight.shape == (48, 16) and mha.in_proj_bias is src.in_proj_bias
    assert mha.out_proj.bias is src.out_proj.bias, "float biases stay the user's Parameters"
    assert {n for n, _ in mha.named_parameters()} == {"in_proj_bias", "out_proj.bias"}
    with pytest.raises(AttributeError, match="in_proj_weight is read-only"):
        mha.in_proj_weight = nn.Parameter(torch.zeros(48, 16))

    twin = _float_twin_mha(mha, keep)
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    out_t, w_t = twin(q, kv, kv)
    (out_t.pow(2).sum() + w_t.sum()).backward()
    expected = {"in": _expected_after_vote(mha.in_proj, twin.in_proj_weight.grad.numpy()),
                "out": _expected_after_vote(mha.out_proj, twin.out_proj.weight.grad.numpy())}
    out, w = mha(q, kv, kv)
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(w, w_t)
    (out.pow(2).sum() + w.sum()).backward()
    torch.testing.assert_close(mha.in_proj_bias.grad, twin.in_proj_bias.grad)
    anx.step(mha)
    _assert_state_equal(_arrays(mha.in_proj), expected["in"])
    _assert_state_equal(_arrays(mha.out_proj), expected["out"])


def test_multihead_attention_with_other_kdim_vdim():
    torch.manual_seed(4)
    mha = anx.ternarize_(nn.MultiheadAttention(8, 2, kdim=6, vdim=4, bias=False), "E1TM4", "flip", K=1, theta=1)
    assert list(anx.tensor_states(mha)) == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"]
    assert mha.in_proj_weight is None and mha.k_proj_weight.shape == (8, 6)
    before = anx.tensor_states(mha)
    out, _ = mha(torch.randn(5, 2, 8), torch.randn(7, 2, 6), torch.randn(7, 2, 4))
    out.pow(2).sum().backward()
    anx.step(mha)
    assert not _states_equal(before, anx.tensor_states(mha))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_trains_and_evaluates(batch_first):
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    model = anx.ternarize_(layer, "E1TM8", "flip", K=1, theta=1)
    assert model is layer and isinstance(layer.self_attn, anx.E1TMMultiheadAttention)
    names = list(anx.tensor_states(model))
    assert names == ["self_attn.in_proj.weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    assert [m.tensor_index for m in anx.e1tm_modules(model).values()] == [0, 1, 2, 3]
    assert all(p.dim() == 1 for p in model.parameters()), "only biases and norm gains stay float"
    before = anx.tensor_states(model)
    x = torch.randn(3, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for _ in range(3):
        y = model(x, src_mask=mask, is_causal=True)
        assert torch.isfinite(y).all()
        y.pow(2).mean().backward()
        anx.step(model)
    after = anx.tensor_states(model)
    for n in names:
        assert not np.array_equal(after[n][1]["T_packed"], before[n][1]["T_packed"]), f"{n} never moved"
    model.eval()
    with torch.no_grad():
        fast = model(x)  # nn.TransformerEncoderLayer's fused inference path, reading .in_proj_weight
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_transformer_trains():
    torch.manual_seed(6)
    t = anx.ternarize_(nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True), "E1TM8", "flip", K=1, theta=1)
    assert len(anx.e1tm_modules(t)) == 10  # encoder 2 + 2, decoder 2 + 2 + 2
    before = anx.tensor_states(t)
    out = t(torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    anx.step(t)
    assert not _states_equal(before, anx.tensor_states(t))


# -- tied Parameters -----------------------------------------------------------------------------------------
def _tied_lm(order="embed_first"):
    torch.manual_seed(7)
    m = _LM(30, 16)
    m.lm_head.weight = m.embed_tokens.weight  # transformers' tie_weights
    if order == "head_first":
        m = nn.ModuleDict({"lm_head": m.lm_head, "embed_tokens": m.embed_tokens})
    return m


def test_tied_parameter_is_one_state_and_votes_once_on_the_summed_gradient():
    model = anx.ternarize_(_tied_lm(), "E1TM16", "carry")
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, anx.E1TMEmbedding) and isinstance(head, anx.E1TMTiedLinear) and head.source is emb
    assert list(anx.e1tm_modules(model)) == ["embed_tokens"] and list(anx.tensor_states(model)) == ["embed_tokens.weight"]
    torch.testing.assert_close(head.weight, emb.weight, rtol=0, atol=0)
    idx = torch.randint(0, 30, (4, 7))

    w = emb.weight.clone().requires_grad_(True)  # the float twin: one weight used twice
    F.cross_entropy((F.embedding(idx, w) @ w.t()).reshape(-1, 30), idx.reshape(-1)).backward()
    expected = _expected_after_vote(emb, w.grad.numpy())
    calls = []
    orig = anx.layers.ops.vote_unchecked
    anx.layers.ops.vote_unchecked = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        F.cross_entropy(model(idx).reshape(-1, 30), idx.reshape(-1)).backward()
        anx.step(model)
    finally:
        anx.layers.ops.vote_unchecked = orig
    assert len(calls) == 1, "a tied weight must vote once per step"
    _assert_state_equal(_arrays(emb), expected)


def test_tied_state_lives_at_the_first_module():
    model = anx.ternarize_(_tied_lm("head_first"), "E1TM16", "carry")
    assert isinstance(model["lm_head"], anx.E1TMLinear) and isinstance(model["embed_tokens"], anx.E1TMTiedEmbedding)
    assert list(anx.tensor_states(model)) == ["lm_head.weight"]
    idx = torch.randint(0, 30, (2, 3))
    torch.testing.assert_close(model["embed_tokens"](idx), _w_eff(model["lm_head"])[idx])
    torch.testing.assert_close(model["embed_tokens"].attend(torch.ones(1, 16)), torch.ones(1, 16) @ _w_eff(model["lm_head"]).t())


def test_a_module_under_two_names_is_replaced_under_both():
    lin = nn.Linear(6, 6, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    anx.ternarize_(model, "E1TM6", "carry")
    assert model[0] is model[2] and isinstance(model[0], anx.E1TMLinear)
    assert list(anx.e1tm_modules(model)) == ["0"]


def test_deepcopy_is_independent():
    torch.manual_seed(8)
    model = anx.ternarize_(nn.Sequential(nn.Linear(8, 8, bias=False)), "E1TM8", "flip", K=1, theta=1)
    twin = copy.deepcopy(model)
    before = anx.tensor_states(model)
    for _ in range(2):
        twin(torch.randn(4, 8)).pow(2).sum().backward()
        anx.step(twin)
    assert _states_equal(before, anx.tensor_states(model)), "training the copy changed the original"
    assert not _states_equal(before, anx.tensor_states(twin))
    torch.testing.assert_close(twin[0].weight, _w_eff(twin[0]), rtol=0, atol=0)


# -- torch.compile -------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # a tied Parameter too

    def forward(self, idx):
        return self.head(F.gelu(self.fc(self.emb(idx))))


# dynamo instantiates the autograd Functions it traces, which torch itself warns about (DeprecationWarning)
_DYNAMO_FN_WARNING = "ignore:.*should not be instantiated:DeprecationWarning"


def _net():
    torch.manual_seed(9)
    return anx.ternarize_(_Net(), "E1TM8", "flip", K=1, theta=1)


def test_custom_ops_pass_opcheck():
    lin = anx.ternarize_(nn.Linear(10, 6, bias=False), "E1TM4", "flip")
    torch.library.opcheck(torch.ops.arbs.materialize.default,
                          (list(lin.state_tensors()), lin._key, [6, 10], torch.float32))


@pytest.mark.filterwarnings(_DYNAMO_FN_WARNING)
def test_compile_has_no_graph_breaks_in_eval_and_training_forward():
    torch._dynamo.reset()
    model = _net().eval()
    idx = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(idx)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    model.train()  # grad enabled: the autograd Functions (forward and backward) are traced whole
    ex = torch._dynamo.explain(model)(idx)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


@pytest.mark.filterwarnings(_DYNAMO_FN_WARNING)
def test_compiled_transformer_encoder_layer():
    """No graph break in eval (no grad: torch's fused encoder path reads .in_proj_weight) nor in the training
    forward; compiled training steps give the eager integers."""

    def make():
        torch.manual_seed(11)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        return anx.ternarize_(layer, "E1TM8", "flip", K=1, theta=1)

    torch._dynamo.reset()
    x = torch.randn(2, 5, 16)
    model = make().eval()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()
    eager, compiled = make(), make()
    assert torch._dynamo.explain(compiled)(x).graph_break_count == 0
    torch._dynamo.reset()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        eager(x).pow(2).mean().backward()
        anx.step(eager)
        fn(x).pow(2).mean().backward()
        anx.step(compiled)
    assert _states_equal(anx.tensor_states(eager), anx.tensor_states(compiled))
    assert not _states_equal(anx.tensor_states(make()), anx.tensor_states(compiled))


def _compiled_steps_equal_eager(backend):
    torch._dynamo.reset()
    eager, compiled, start = _net(), _net(), _net()
    step_fn = torch.compile(compiled, backend=backend, fullgraph=True)
    calls = []
    orig = anx.E1TMWeight.receive_grad

    def spy(self, grad, state=None, borrowed=False):
        calls.append(borrowed)
        return orig(self, grad, state, borrowed)

    anx.E1TMWeight.receive_grad = spy
    try:
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            idx, y = torch.randint(0, 50, (4, 6), generator=gen), torch.randint(0, 50, (4, 6), generator=gen)
            F.cross_entropy(eager(idx).flatten(0, 1), y.flatten()).backward()
            anx.step(eager)
            F.cross_entropy(step_fn(idx).flatten(0, 1), y.flatten()).backward()
            anx.step(compiled)
    finally:
        anx.E1TMWeight.receive_grad = orig
    assert calls.count(True) == 12, "the compiled backward votes through arbs::vote (3 uses a step)"
    assert _states_equal(anx.tensor_states(eager), anx.tensor_states(compiled))
    assert not _states_equal(anx.tensor_states(start), anx.tensor_states(compiled))
    assert anx.model_clock(eager).stats == anx.model_clock(compiled).stats
    compiled.eval()
    eager.eval()
    idx = torch.randint(0, 50, (2, 3), generator=gen)
    with torch.no_grad():
        exact = {"rtol": 0, "atol": 0} if backend == "aot_eager" else {}  # inductor fuses the float ops its own way
        torch.testing.assert_close(step_fn(idx), eager(idx), **exact)


@pytest.mark.filterwarnings(_DYNAMO_FN_WARNING)
def test_compiled_training_gives_the_eager_integers():
    _compiled_steps_equal_eager("aot_eager")  # AOTAutograd: functionalized forward and backward graphs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own (torch.jit.script_method, ...)
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_training_gives_the_eager_integers():
    _compiled_steps_equal_eager("inductor")


# -- the eval-mode W_eff cache -------------------------------------------------------------------------------
@pytest.fixture
def materialize_calls(monkeypatch):
    """Calls of E1TMWeight.materialize (what a layer's forward uses; _w_eff above calls ops directly)."""
    calls = []
    orig = anx.E1TMWeight.materialize
    monkeypatch.setattr(anx.E1TMWeight, "materialize", lambda self, *a, **k: (calls.append(1), orig(self, *a, **k))[1])
    return calls


def test_eval_cache_materializes_once_until_the_state_changes(materialize_calls):
    torch.manual_seed(10)
    model = anx.ternarize_(nn.Sequential(nn.Linear(16, 16, bias=False)), "E1TM8", "flip", K=1, theta=1,
                           horizon=100)
    lin = model[0]
    x = torch.randn(2, 16)

    def frozen(n=3):
        materialize_calls.clear()
        model.eval()
        with torch.no_grad():
            outs = [model(x) for _ in range(n)]
        torch.testing.assert_close(outs[-1], x @ _w_eff(lin).t(), rtol=0, atol=0)
        return len(materialize_calls)

    assert frozen() == 1, "3 frozen forwards: one materialize"
    assert frozen() == 0, "still cached"
    model.train()
    model(x).pow(2).sum().backward()  # a vote
    anx.step(model)
    assert frozen() == 1
    anx.model_clock(model).step_counter += 1  # average's Xi depends on the step; the cache key holds it
    assert frozen() == 1
    lin.load_arrays(_arrays(lin))
    assert frozen() == 1
    anx.load_tensor_states(model, {"0.weight": _arrays(lin)}, anx.model_clock(model).step_counter)
    assert frozen() == 1
    anx.enter_fuse_phase_(model)
    assert frozen() == 1
    with torch.no_grad():
        lin.E.add_(1)  # an in-place torch write: the tensor's version counter moves
    assert frozen() == 1
    materialize_calls.clear()
    with torch.no_grad():
        model(x)
    lin.state_arrays()["E"][0, 0] -= 1  # a numpy write is not seen ...
    with torch.no_grad():
        model(x)
    assert len(materialize_calls) == 0
    lin.invalidate()  # ... until invalidate()
    assert frozen() == 1
    lin.E = lin.E.clone()  # a replaced buffer
    assert frozen() == 1


def test_eval_cache_is_never_used_in_training_mode_or_with_grad(materialize_calls):
    lin = anx.ternarize_(nn.Linear(16, 8, bias=False), "E1TM8", "carry")
    x = torch.randn(2, 16)
    lin.train()
    with torch.no_grad():
        for _ in range(3):
            lin(x)
    assert len(materialize_calls) == 3 and lin._cache is None
    lin.eval()
    materialize_calls.clear()
    for _ in range(2):
        lin(x).sum().backward()  # grad enabled: forward and backward materialize
    assert len(materialize_calls) == 4
    anx.step(lin)
