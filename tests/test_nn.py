"""arbs.nn: E1TM modules vote on exactly the gradient a float model with the same W_eff would get."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arbs import nn as anx
from arbs import ops
from arbs.errors import ConfigError, NonFiniteError
from arbs.models.gpt import GPT, GPTConfig


def _float_twin_grad(mod: anx.E1TMWeight, fn):
    """Gradient of fn(W) at W = mod's current W_eff, computed by plain autograd."""
    w = mod.materialize().clone().requires_grad_(True)
    fn(w).backward()
    return w.grad.numpy()


def _expected_after_vote(mod, grad):
    state = {k: v.copy() for k, v in mod.state_arrays().items()}
    ops.vote(state, grad.astype(np.float32), mod.shape, mod.clock.scheme)
    return state


def _arrays(mod):
    return {k: v.copy() for k, v in mod.state_arrays().items()}


def _assert_state_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
def test_linear_votes_on_the_true_weight_gradient(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40, bias=False))
    anx.ternarize_(model, "E1TM8", rule)
    lin = model[0]
    assert not list(lin.parameters()), "E1TM weights must not be Parameters"
    x = torch.randn(5, 24)
    target = torch.randn(5, 40)
    g = _float_twin_grad(lin, lambda w: ((x @ w.t() - target) ** 2).sum())
    expected = _expected_after_vote(lin, g)
    loss = ((model(x) - target) ** 2).sum()
    loss.backward()
    assert anx.step(model) == 1
    _assert_state_equal(_arrays(lin), expected)


def test_tied_embedding_votes_once_on_summed_gradient():
    torch.manual_seed(1)
    emb = nn.Embedding(30, 16)
    holder = nn.ModuleDict({"emb": emb})
    anx.ternarize_(holder, "E1TM16", "carry")
    e = holder["emb"]
    idx = torch.randint(0, 30, (4, 7))

    def f(w):
        h = F.embedding(idx, w)
        return F.cross_entropy((h @ w.t()).reshape(-1, 30), idx.reshape(-1))

    g = _float_twin_grad(e, f)
    expected = _expected_after_vote(e, g)
    calls = []
    orig = anx.layers.ops.vote_unchecked
    anx.layers.ops.vote_unchecked = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        h = e(idx)
        loss = F.cross_entropy(e.attend(h).reshape(-1, 30), idx.reshape(-1))
        loss.backward()
        anx.step(holder)
    finally:
        anx.layers.ops.vote_unchecked = orig
    assert len(calls) == 1, "a tied weight must vote once per step"
    _assert_state_equal(_arrays(e), expected)


def test_accumulate_micro_batches_votes_once_on_sum():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 12, bias=False))
    anx.ternarize_(model, "E1TM4", "flip")
    lin = model[0]
    xs = [torch.randn(3, 10) for _ in range(3)]
    g = sum(_float_twin_grad(lin, lambda w, x=x: (x @ w.t()).pow(2).sum()) for x in xs)
    expected = _expected_after_vote(lin, g)
    with anx.accumulate(model):
        for x in xs:
            model(x).pow(2).sum().backward()
    anx.step(model)
    _assert_state_equal(_arrays(lin), expected)


def test_step_counter_once_per_step_and_average_rule_uses_it():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False))
    model = anx.ternarize_(model, "E1TM8", "average")
    clock = anx.model_clock(model)
    for i in range(3):
        model(torch.randn(2, 8)).sum().backward()
        anx.step(model)
    assert clock.step_counter == 3
    lin = model[0]
    st = lin.state_arrays()
    assert np.abs(st["corr_accum"]).max() <= 3 * 8


def test_no_grad_forward_does_not_leave_pending_votes():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    anx.ternarize_(model, "E1TM8", "carry")
    before = _arrays(model[0])
    with torch.no_grad():
        model(torch.randn(2, 8))
    anx.step(model)
    _assert_state_equal(_arrays(model[0]), before)


def test_nan_gradient_raises_and_keeps_state():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    anx.ternarize_(model, "E1TM8", "flip")
    before = _arrays(model[0])
    y = model(torch.randn(2, 8))
    with pytest.raises(NonFiniteError):
        (y * float("nan")).sum().backward()
    _assert_state_equal(_arrays(model[0]), before)


def test_gpt_becomes_integer_only_and_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)
    model = GPT(cfg)
    anx.ternarize_(model, "E1TM8", "flip")
    assert not list(model.parameters()), "every weight of the built-in model must be E1TM"
    for b in model.buffers():
        assert not b.is_floating_point()
    x = torch.randint(0, 256, (8, 16))
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        anx.step(model)
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] - 0.5


def test_model_without_e1tm_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="ternarize_"):
        anx.step(nn.Sequential(nn.ReLU()))


def test_docs_example_runs():
    """docs/training.md's 'your own model' example, executed as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "training.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/training.md", "exec"), ns)
    assert ns["losses"][-1] < ns["losses"][0]


def test_ternarize_rejects_a_parameter_the_rule_does_not_take():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    with pytest.raises(ConfigError, match="rule 'carry' takes no parameter gain"):
        anx.ternarize_(model, "E1TM8", "carry", gain=4)
    assert anx.ternarize_(model, "E1TM8", "flip", gain=4, horizon=10, seed=3) is model
    clock = anx.model_clock(model)
    assert clock.scheme.params == {"K": 16, "theta": 16, "gain": 4, "horizon": 10, "vote_max": 3, "vote_norm": 1, "reset": 0} and clock.seed == 3


def test_state_arrays_follow_a_replaced_buffer():
    """The cached numpy views are rebuilt when a buffer is replaced (not copied into), so materialize
    and votes never act on a stale array."""
    lin = nn.Sequential(nn.Linear(6, 4, bias=False))
    anx.ternarize_(lin, "E1TM4", "carry")
    m = lin[0]
    before = m.materialize().clone()
    m.E = m.E + 1  # a new tensor: every scale doubles
    assert np.array_equal(m.state_arrays()["E"], m.E.numpy())
    torch.testing.assert_close(m.materialize(), 2 * before, rtol=0, atol=0)


def test_a_replaced_buffer_of_the_wrong_dtype_is_refused():
    lin = nn.Sequential(nn.Linear(6, 4, bias=False))
    anx.ternarize_(lin, "E1TM4", "carry")
    m = lin[0]
    m.materialize()
    m.E = m.E.to(torch.int16)
    with pytest.raises(TypeError, match="E has dtype int16"):
        m.materialize()
