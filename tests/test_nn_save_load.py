"""arbs.nn.save / load_: a user's ternarized model (float bias, LayerNorm, tied embedding/head) saved as a normal
checkpoint and restored bit for bit; the float part of a checkpoint; inspect; arbs train --init <E1TM run>."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as tnn
from arbs_cli.main import main
from click.testing import CliRunner

import arbs.nn as anx
from arbs import store
from arbs.errors import ConfigError, CorruptStoreError
from arbs.models.gpt import GPT, GPTConfig

VOCAB, D = 32, 16


class UserModel(tnn.Module):
    """What a user brings: a Linear with bias, a LayerNorm, an embedding tied to the output head."""

    def __init__(self, d=D, norm=True):
        super().__init__()
        self.emb = tnn.Embedding(VOCAB, d)
        self.ln = tnn.LayerNorm(d) if norm else tnn.Identity()
        self.fc = tnn.Linear(d, d)
        self.head = tnn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.ln(self.emb(idx))
        return self.head(h + torch.relu(self.fc(h)))


def make(seed=0, fmt="E1TM8", rule="flip", clock_seed=5, **kw):
    torch.manual_seed(seed)
    if rule == "flip":
        kw.setdefault("horizon", 50)
    return anx.ternarize_(UserModel(**kw.pop("model", {})), fmt, rule, seed=clock_seed, **kw)


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randint(0, VOCAB, (4, 8), generator=g)
    return x, torch.roll(x, -1, 1)


def train(model, steps, start):
    """``steps`` steps from batch ``start``: votes for the E1TM state, plain SGD (stateless) for the floats."""
    opt = torch.optim.SGD(anx.float_parameters(model).values(), lr=0.05)
    losses = []
    for i in range(start, start + steps):
        x, y = batch(i)
        loss = tnn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        anx.step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def state(model):
    ints = {(n, k): a.copy() for n, (_, arrs) in anx.tensor_states(model).items() for k, a in arrs.items()}
    floats = {n: p.detach().clone() for n, p in anx.float_parameters(model).items()}
    return ints, floats, anx.model_clock(model).step_counter


def assert_same(a, b):
    (ia, fa, sa), (ib, fb, sb) = a, b
    assert sa == sb
    assert ia.keys() == ib.keys() and fa.keys() == fb.keys()
    for k in ia:
        assert ia[k].dtype == ib[k].dtype and np.array_equal(ia[k], ib[k]), k
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("fuse_phase", [False, True])
def test_save_load_restores_everything_and_training_continues_identically(tmp_path, fuse_phase):
    a = make()
    assert sorted(anx.float_parameters(a)) == ["fc.bias", "ln.bias", "ln.weight"]
    train(a, 2, 0)
    if fuse_phase:
        anx.enter_fuse_phase_(a)
    train(a, 1, 2)
    saved = state(a)
    path = anx.save(a, tmp_path / "run", meta={"note": "mine"})
    assert path == tmp_path / "run" / "step_3"

    b = make(seed=1)  # other float init, so its state differs until loaded
    assert not all(torch.equal(p, q) for p, q in zip(state(b)[1].values(), saved[1].values()))
    ck = anx.load_(b, tmp_path / "run")
    assert ck.meta["note"] == "mine" and ck.step_counter == 3 and not ck.integer_only
    assert_same(state(b), saved)
    assert anx.model_clock(b).fuse_phase is fuse_phase
    assert anx.model_clock(b).seed == 5

    la, lb = train(a, 3, 3), train(b, 3, 3)
    assert la == lb
    assert_same(state(b), state(a))
    assert anx.model_clock(b).step_counter == 6


def test_load_accepts_a_checkpoint_object_and_restores_the_seed(tmp_path):
    a = make(clock_seed=11)
    train(a, 2, 0)
    anx.save(a, tmp_path / "run")
    b = make(clock_seed=0)
    anx.load_(b, store.open_checkpoint(tmp_path / "run" / "step_2"))
    assert anx.model_clock(b).seed == 11
    assert train(a, 2, 2) == train(b, 2, 2)


# --------------------------------------------------------------------------------------------- errors


def saved_run(tmp_path):
    a = make()
    train(a, 1, 0)
    anx.save(a, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(("kw", "words"), [
    ({"fmt": "E1TM16"}, ["'E1TM8'", "'E1TM16'"]),
    ({"rule": "carry"}, ["'flip'", "'carry'"]),
    ({"theta": 3}, ["theta=", "(model: 3)"]),
    ({"model": {"d": 20}}, ["emb.weight", "(32, 16)", "(32, 20)"]),
    ({"model": {"norm": False}}, ["float parameters", "ln.weight"]),
])
def test_load_of_a_model_ternarized_otherwise_is_a_clear_error_and_changes_nothing(tmp_path, kw, words):
    run = saved_run(tmp_path)
    b = make(seed=3, **kw)
    before = state(b)
    with pytest.raises(ConfigError) as e:
        anx.load_(b, run)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert_same(state(b), before)


def test_load_of_other_e1tm_tensors_names_them(tmp_path):
    run = saved_run(tmp_path)
    torch.manual_seed(0)
    b = anx.ternarize_(UserModel(), "E1TM8", "flip", seed=5, horizon=50, include=lambda n, m: n != "fc")
    with pytest.raises(ConfigError, match="fc.weight"):
        anx.load_(b, run)


def test_load_refuses_fused_and_float_checkpoints(tmp_path):
    from arbs.fuse import fuse_checkpoint

    run = saved_run(tmp_path)
    ck = store.open_checkpoint(run)
    fused = fuse_checkpoint(store.Checkpoint(**{**ck.__dict__, "float_params": {}, "path": None}))[0]
    with pytest.raises(ConfigError, match="fused"):
        anx.load_(make(), fused)
    flt = store.Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=0,
                           tensors={}, meta={})
    store.save_checkpoint(tmp_path / "f", flt)
    with pytest.raises(ConfigError, match="float"):
        anx.load_(make(), tmp_path / "f")


def test_save_refuses_pending_votes_and_the_reserved_meta_key(tmp_path):
    a = make()
    with pytest.raises(ConfigError, match="reserved"):
        anx.save(a, tmp_path / "r", meta={"arbs.nn": 1})
    x, y = batch(0)
    with anx.accumulate(a):
        tnn.functional.cross_entropy(a(x).reshape(-1, VOCAB), y.reshape(-1)).backward()
    with pytest.raises(ConfigError, match="step"):
        anx.save(a, tmp_path / "r")
    anx.step(a)
    anx.save(a, tmp_path / "r")
    with pytest.raises(Exception, match="already exists"):  # checkpoints are never overwritten
        anx.save(a, tmp_path / "r")


# ------------------------------------------------------------------------------- the checkpoint's float part


def test_integer_only_flag_and_layout(tmp_path):
    torch.manual_seed(0)
    gpt = anx.ternarize_(GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)), "E1TM8", "flip")
    assert not anx.float_parameters(gpt)  # every model arbs builds is integer-only
    p = anx.save(gpt, tmp_path / "gpt")
    attrs = json.loads((p / "zarr.json").read_text())["attributes"]
    assert "float_params" not in attrs and not (p / "_float").exists()
    ck = store.open_checkpoint(p)
    assert ck.integer_only and ck.float_params == {}

    q = anx.save(make(), tmp_path / "user")
    attrs = json.loads((q / "zarr.json").read_text())["attributes"]
    assert [f["name"] for f in attrs["float_params"]] == ["ln.weight", "ln.bias", "fc.bias"]
    assert all(f["dtype"] == "float32" and f["shape"] == [D] for f in attrs["float_params"])
    assert sorted(e.name for e in (q / "_float").iterdir()) == ["fc.bias", "ln.bias", "ln.weight", "zarr.json"]
    assert sorted(k for k in json.loads((q / "COMMIT").read_text())["arrays"] if k.startswith("_float/")) == \
        ["_float/fc.bias", "_float/ln.bias", "_float/ln.weight"]
    ck = store.open_checkpoint(q)
    assert not ck.integer_only and ck.float_params["ln.weight"].dtype == np.float32
    assert store.float_nbytes(ck) == 3 * D * 4


def test_a_float_array_outside_the_float_group_is_refused(tmp_path):
    q = anx.save(make(), tmp_path / "user")
    bad = tmp_path / "bad" / "step_0"
    shutil.copytree(q, bad)
    shutil.copytree(bad / "_float" / "ln.weight", bad / "stray")
    with pytest.raises(CorruptStoreError, match="no float arrays outside '_float'"):
        store.open_checkpoint(bad)
    ck = store.open_checkpoint(q)
    tensors = dict(ck.tensors)
    name = next(iter(tensors))
    t = tensors[name]
    tensors[name] = store.TensorState(name=name, shape=t.shape, arrays={**t.arrays, "E": t.arrays["E"].astype(np.float32)})
    with pytest.raises(ConfigError, match="no float arrays"):
        store.check_checkpoint(store.Checkpoint(**{**ck.__dict__, "tensors": tensors, "path": None}))
    flt = store.Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=0,
                           tensors={}, meta={}, float_params={"b": np.zeros(2, np.float32)})
    with pytest.raises(ConfigError, match="float_params"):
        store.check_checkpoint(flt)
    with pytest.raises(ConfigError, match="dtype"):
        store.check_checkpoint(store.Checkpoint(**{**ck.__dict__, "path": None, "float_params": {"b": np.zeros(2, np.int32)}}))


def test_the_float_group_and_attribute_go_together(tmp_path):
    q = anx.save(make(), tmp_path / "user")
    bad = tmp_path / "bad" / "step_0"
    shutil.copytree(q, bad)
    shutil.rmtree(bad / "_float")
    with pytest.raises(CorruptStoreError, match="_float"):
        store.open_checkpoint(bad)


def test_a_bfloat16_parameter_is_saved_as_float32_and_restored_exactly(tmp_path):
    a = make()
    with torch.no_grad():
        a.ln.weight.data = (torch.randn(D) * 3).to(torch.bfloat16)
    anx.save(a, tmp_path / "r")
    b = make()
    b.ln.weight.data = torch.zeros(D, dtype=torch.bfloat16)
    anx.load_(b, tmp_path / "r")
    assert b.ln.weight.dtype == torch.bfloat16 and torch.equal(b.ln.weight, a.ln.weight)


def test_inspect_bpw_counts_float_bytes_apart(tmp_path):
    q = anx.save(make(), tmp_path / "user")
    r = CliRunner().invoke(main, ["inspect", str(q), "--bpw"])
    assert r.exit_code == 0, r.output
    assert "NOT integer-only" in r.stdout and "float parameters: 3 (48 values, 192 B" in r.stdout
    assert "ln.weight" in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(q), "--bpw", "--json"])
    doc = json.loads(r.stdout)
    assert doc["integer_only"] is False
    tot = doc["total"]
    assert tot["float_bytes"] == 192 and tot["float_params"] == 3 and tot["float_values"] == 48
    assert tot["array_bytes"] == store.array_nbytes(store.open_checkpoint(q))  # E1TM figures leave floats out
    assert [f["name"] for f in doc["float_params"]] == ["ln.weight", "ln.bias", "fc.bias"]

    torch.manual_seed(0)
    gpt = anx.ternarize_(GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)), "E1TM8", "flip")
    p = anx.save(gpt, tmp_path / "gpt")
    r = CliRunner().invoke(main, ["inspect", str(p), "--bpw"])
    assert r.exit_code == 0 and "float parameters" not in r.stdout
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(p), "--json"]).stdout)
    assert doc["integer_only"] is True and doc["total"]["float_bytes"] == 0


# ----------------------------------------------------------------------------- arbs train --init <E1TM run>

TINY = ["--context", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--seed", "4"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "a.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    (d / "b.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 300)
    return str(d / "a.txt"), str(d / "b.txt")


@pytest.fixture(scope="module")
def e1tm_run(tmp_path_factory, texts):
    run = tmp_path_factory.mktemp("init") / "a"
    r = CliRunner().invoke(main, ["train", "--format", "E1TM16", "--data", texts[0], "--steps", "4", "--out", str(run),
                                  "--fuse-phase", "0", *TINY])
    assert r.exit_code == 0, r.output
    return run


def arrays_of(path):
    ck = store.open_checkpoint(path)
    return {(n, k): a for n, t in ck.tensors.items() for k, a in t.arrays.items()}, ck


@pytest.mark.parametrize("rule", ["flip", "carry"])
def test_train_init_from_an_e1tm_run_starts_from_its_integer_state(tmp_path, texts, e1tm_run, rule):
    new = tmp_path / "new"
    r = CliRunner().invoke(main, ["train", "--format", "E1TM16", "--rule", rule, "--init", str(e1tm_run),
                                  "--data", texts[1], "--steps", "3", "--out", str(new), "--json", *TINY])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 3
    init, ick = arrays_of(e1tm_run)
    got, ck = arrays_of(new / "step_0")
    assert ick.step_counter == 4 and ck.step_counter == 0 and ck.rule == rule and ck.integer_only
    for (n, k), a in got.items():  # T_packed, E, corr_accum and (flip -> flip, same theta) flip_accum: copied
        assert np.array_equal(a, init[(n, k)]), (n, k)
    assert {k for _, k in got} == ({"T_packed", "E", "corr_accum", "flip_accum"} if rule == "flip"
                                   else {"T_packed", "E", "corr_accum"})
    for k in ("corr_accum", "flip_accum"):  # the init had trained: its accumulators are not the fresh zeros
        assert any(np.any(a) for (_, kk), a in init.items() if kk == k)
    assert store.open_checkpoint(new).step_counter == 3  # and it trained


def test_train_init_from_carry_to_flip_starts_flip_accum_at_zero(tmp_path, texts, e1tm_run):
    carry = tmp_path / "carry"
    r = CliRunner().invoke(main, ["train", "--format", "E1TM16", "--rule", "carry", "--init", str(e1tm_run),
                                  "--data", texts[1], "--steps", "2", "--out", str(carry), *TINY])
    assert r.exit_code == 0, r.output
    flip = tmp_path / "flip"
    r = CliRunner().invoke(main, ["train", "--format", "E1TM16", "--init", str(carry), "--data", texts[0],
                                  "--steps", "1", "--out", str(flip), *TINY])
    assert r.exit_code == 0, r.output
    init, _ = arrays_of(carry)
    got, _ = arrays_of(flip / "step_0")
    for (n, k), a in got.items():
        assert np.array_equal(a, np.zeros_like(a) if k == "flip_accum" else init[(n, k)]), (n, k)


def test_train_init_from_an_e1tm_run_of_another_format_is_refused(tmp_path, texts, e1tm_run):
    r = CliRunner().invoke(main, ["train", "--format", "E1TM32", "--init", str(e1tm_run), "--data", texts[1],
                                  "--steps", "1", "--out", str(tmp_path / "x"), *TINY])
    assert r.exit_code == 1
    assert "E1TM16" in r.stderr and "E1TM32" in r.stderr and "--format E1TM16" in r.stderr
    from arbs.training.build import init_from_e1tm

    torch.manual_seed(0)
    small = anx.ternarize_(GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)), "E1TM16", "flip")
    with pytest.raises(ConfigError, match="does not fit the model.*--preset"):
        init_from_e1tm(small, store.open_checkpoint(e1tm_run))


def test_init_from_average_or_fused_e1tm_fuses_the_scales_into_E(tmp_path):
    from arbs import formats, ops
    from arbs.fuse import fuse_checkpoint
    from arbs.training.build import init_from_e1tm

    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, context=16)
    torch.manual_seed(0)
    avg = anx.ternarize_(GPT(cfg), "E1TM16", "average")
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        avg(x, torch.roll(x, -1, 1))[1].backward()
        anx.step(avg)
    ck = store.open_checkpoint(anx.save(avg, tmp_path / "avg"))
    scheme = formats.make_scheme("E1TM16", "average")
    assert any(np.any(t.arrays["corr_accum"]) for t in ck.tensors.values())
    for init in (ck, fuse_checkpoint(ck)[0]):
        torch.manual_seed(1)
        new = anx.ternarize_(GPT(cfg), "E1TM16", "flip")
        init_from_e1tm(new, init)
        got = anx.tensor_states(new)
        assert anx.model_clock(new).step_counter == 0
        for n, t in ck.tensors.items():
            arrays = got[n][1]
            assert np.array_equal(arrays["T_packed"], t.arrays["T_packed"])
            assert np.array_equal(arrays["E"], ops.fuse(t.arrays, t.shape, scheme, 3)[0])
            assert not arrays["corr_accum"].any() and not arrays["flip_accum"].any()
