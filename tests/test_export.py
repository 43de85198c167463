"""arbs export: every target proven exact (transformers logits, gguf dequantized bit for bit, the e1tm file
round-trips through eval), the grid fuse that makes TQ types exact, and every bad input refused with
nothing written. Models are tiny and made here; nothing is downloaded (HF_HUB_OFFLINE=1)."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: there is no model hub here
transformers = pytest.importorskip("transformers", reason="needs the optional extra arbs[hf] (transformers)")
pytest.importorskip("tokenizers", reason="needs the optional extra arbs[hf] (tokenizers)")
gguf = pytest.importorskip("gguf", reason="needs the optional extra arbs[export] (gguf)")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from arbs import export as ex  # noqa: E402
from arbs import formats, ops, store  # noqa: E402
from arbs.fuse import checkpoint_weights, fuse_checkpoint  # noqa: E402
from arbs.models.config import GPTConfig  # noqa: E402
from arbs.training.build import build, fused_model, to_checkpoint  # noqa: E402
from arbs_cli.main import main  # noqa: E402

TRAIN = ["--batch-size", "2", "--context", "32", "--eval-every", "4", "--eval-batches", "1"]
EVAL = ["--batch-size", "2", "--batches", "2"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(r):
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _refused(r, *words):
    assert r.exit_code == 1, r.output + repr(r.exception)
    for w in words:
        assert w in r.output, (w, r.output)
    return r


def _no_tmp(d):
    assert not [p.name for p in d.iterdir() if p.name.startswith(store.TMP_PREFIX)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text):
    """A trained tiny byte model (training + fused run), an fp32 baseline run, and a d_model 256 model
    (mlp hidden 512: every row a multiple of 256) fused plainly and onto the 256 grid."""
    root = tmp_path_factory.mktemp("export")
    _ok(_cli("train", "--data", text, "--steps", 4, "--out", root / "run", *TRAIN))
    _ok(_cli("fuse", root / "run", "--out", root / "fused"))
    _ok(_cli("train", "--data", text, "--steps", 2, "--format", "fp32", "--out", root / "fp32", *TRAIN))
    meta = dict(store.open_checkpoint(root / "run").meta)
    meta["model"] = GPTConfig(n_layer=1, n_head=2, d_model=256, context=32, mlp_ratio=3).to_dict()
    model, handles = build(meta)
    ck = to_checkpoint(model, handles, meta, 0)
    store.save_checkpoint(root / "wide-train", ck)
    store.save_checkpoint(root / "wide", fuse_checkpoint(ck)[0], step=0)
    store.save_checkpoint(root / "wide-grid", fuse_checkpoint(ck, grid=256)[0], step=0)
    return root


# ------------------------------------------------------------------------------------------------- hf


def test_hf_export_of_the_byte_model_gives_arbs_logits(runs, tmp_path):
    out = tmp_path / "hf"
    r = _ok(_cli("export", runs / "fused", "--to", "hf", out))
    assert "bfloat16" in r.output and "bit for bit" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 256
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def f(x):\n    return ünï€ \x00\t"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    arbs_model = fused_model(store.open_checkpoint(runs / "fused")).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = arbs_model(x)[0], hf_model(input_ids=x).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    _no_tmp(tmp_path)


def _hf_source(root, kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the ternary model weights are integer state only " * 20], trainer)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if kind == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=280, n_embd=64, n_layer=2, n_head=4,
                                                                 n_positions=64, bos_token_id=None, eos_token_id=None))
    elif kind == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=280, **small))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=280, tie_word_embeddings=True, **small))
    with torch.no_grad():  # norm gains away from 1, so that folding is not trivial
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape))
    d = root / kind
    m.save_pretrained(d)
    (d / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return d


@pytest.mark.parametrize("kind", ["llama_tied", "qwen2", "gpt2"])
def test_hf_run_exports_its_own_architecture(tmp_path, kind):
    """An HF run (here converted, step 0, fused in memory by --fuse) exports as its own model type: gains
    1 where folded, biases and a kept final norm as they are (float32, since they are not bf16-exact)."""
    run = tmp_path / "conv"
    _ok(_cli("convert", _hf_source(tmp_path, kind), "--out", run))
    out = tmp_path / "hf"
    r = _ok(_cli("export", run, "--to", "hf", out, "--fuse", "--json"))
    doc = json.loads(r.output)
    assert doc["exact"] and doc["fused_in_memory"] and doc["dtype"] == "float32"
    ck = store.open_checkpoint(run)
    want_model = fused_model(ck).eval()
    got_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    assert got_model.config.model_type == kind.split("_")[0]
    x = torch.randint(0, 280, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = want_model(x)[0], got_model(input_ids=x).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (out / "tokenizer.json").read_bytes() and transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    _refused(_cli("export", run, "--to", "gguf", tmp_path / "m.gguf", "--fuse"), "Hugging Face", "--to hf")


# ------------------------------------------------------------------------------------------------- gguf


def _read_gguf(path):
    """name -> float32 array (row-major, (rows, cols)) and name -> type name, via gguf's reader and dequantize."""
    r = gguf.GGUFReader(path)
    arrays, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        arrays[t.name] = a.reshape(shape)
        types[t.name] = t.tensor_type.name.lower()
    return r, arrays, types


def _expected(run_dir):
    ck = store.open_checkpoint(run_dir)
    cfg = GPTConfig.from_dict(ck.meta["model"])
    return {n: a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a for n, _, a in
            ex.gguf_tensors(cfg, checkpoint_weights(ck))}


def _same_bits(a, b):
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("qtype", list(ex.GGUF_TYPES))
def test_gguf_every_type_dequantizes_to_the_fused_weights_bit_for_bit(runs, tmp_path, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    r = _ok(_cli("export", runs / "wide-grid", "--to", "gguf", out, "--type", qtype, "--json"))
    assert json.loads(r.output)["exact"]
    reader, got, types = _read_gguf(out)
    want = _expected(runs / "wide-grid")
    assert set(got) == set(want)
    for n in want:
        assert _same_bits(got[n], want[n]), n
        assert types[n] == (qtype if want[n].ndim == 2 else "f32")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 256


def test_gguf_default_is_the_smallest_exact_type_per_tensor(runs, tmp_path):
    out = tmp_path / "tiny.gguf"
    doc = json.loads(_ok(_cli("export", runs / "fused", "--to", "gguf", out, "--json")).output)
    assert doc["exact"] and doc["dtype"] is None
    # d_model 128: rows are not a multiple of 256, so no TQ; E1TM32 has one E per 32 weights: q4_0 holds it
    assert {t["dtype"] for t in doc["tensors"] if len(t["shape"]) == 2} == {"q4_0"}
    _, got, _ = _read_gguf(out)
    want = _expected(runs / "fused")
    assert all(_same_bits(got[n], want[n]) for n in want)
    # a list: each tensor gets the first listed type that holds it exactly
    doc = json.loads(_ok(_cli("export", runs / "fused", "--to", "gguf", tmp_path / "l.gguf", "--type", "tq2_0,q8_0",
                              "--json")).output)
    assert doc["exact"] and {t["dtype"] for t in doc["tensors"] if len(t["shape"]) == 2} == {"q8_0"}
    doc = json.loads(_ok(_cli("export", runs / "wide-grid", "--to", "gguf", tmp_path / "w.gguf", "--json")).output)
    assert {t["dtype"] for t in doc["tensors"] if len(t["shape"]) == 2} == {"tq1_0"}
    assert doc["bpw_file"] < 2.2


def test_rope_rows_are_permuted_to_llama_cpp_order():
    w = np.arange(2 * 8)[:, None].repeat(3, 1)  # 2 heads of size 8: rows 0..15
    p = ex.permute_rope_rows(w, 2)[:, 0]
    assert p.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ------------------------------------------------------------------------------------------------- e1tm


def test_e1tm_file_round_trips_and_evaluates_as_the_checkpoint(runs, tmp_path):
    out = tmp_path / "m.e1tm.safetensors"
    r = _ok(_cli("export", runs / "fused", "--to", "e1tm", out))
    assert "xz" in r.output and "parameter-golf" in r.output
    a, b = store.open_checkpoint(runs / "fused"), store.open_checkpoint(out)
    assert b.fused and b.format == a.format and b.meta == a.meta and list(a.tensors) == list(b.tensors)
    for n, t in a.tensors.items():
        for k, arr in t.arrays.items():
            assert np.array_equal(arr, b.tensors[n].arrays[k]) and arr.dtype == b.tensors[n].arrays[k].dtype
    want = json.loads(_ok(_cli("eval", runs / "fused", "--json", *EVAL)).output)
    got = json.loads(_ok(_cli("eval", out, "--json", *EVAL)).output)
    assert got["val_loss"] == want["val_loss"] and got["fused"]
    gen = ["--prompt", "def ", "--max-bytes", 12, "--temperature", 0]
    assert _ok(_cli("generate", out, *gen)).output == _ok(_cli("generate", runs / "fused", *gen)).output
    # a damaged file is refused, naming it
    raw = bytearray(out.read_bytes())
    raw[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    _refused(_cli("eval", bad, *EVAL), str(bad))


# ------------------------------------------------------------------------------------------------- grid fuse


def test_grid_fuse_gives_one_E_per_256_weights(runs):
    ck = store.open_checkpoint(runs / "wide-grid")
    for n, t in ck.tensors.items():
        E = t.arrays["E"]
        per = 256 // ck.gs
        assert (E.reshape(E.shape[0], -1, per) == E.reshape(E.shape[0], -1, per)[..., :1]).all(), n
    assert ck.meta["fused_from"]["grid"] == 256
    again, report = fuse_checkpoint(ck, grid=256)  # a fused checkpoint re-grids; idempotent on the grid
    assert report.changed == 0 and all(t.grid_rel_l2 == 0 for t in report.tensors)
    s = formats.make_scheme("E1TM96", "flip")
    state = {"T_packed": np.zeros((2, 39), np.uint8), "E": np.zeros((2, 2), np.int8),
             "corr_accum": np.zeros((2, 2), np.int64), "flip_accum": np.zeros((2, 192), np.int8)}
    with pytest.raises(Exception, match="multiple of 96"):
        ops.fuse_to_grid(state, (2, 192), s, 0, block=256)


def test_fuse_cli_grid(runs, tmp_path):
    r = _ok(_cli("fuse", runs / "wide-train", "--grid", 256, "--out", tmp_path / "g"))
    assert "one E per 256 weights" in r.output and "grid_rel_l2" in r.output
    _ok(_cli("export", tmp_path / "g", "--to", "gguf", tmp_path / "g.gguf", "--type", "tq2_0"))


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_exit_1_and_write_nothing(runs, tmp_path):
    out = tmp_path / "o.gguf"
    # a training checkpoint: refused without --fuse
    _refused(_cli("export", runs / "run", "--to", "gguf", out), "training checkpoint", "--fuse", "arbs fuse")
    # a type that cannot hold the shapes: names the tensor, the reason and the exact type
    _refused(_cli("export", runs / "fused", "--to", "gguf", out, "--type", "tq1_0"),
             "token_embd.weight", "not a multiple of the tq1_0 block of 256", "exact: q4_0")
    # ... or the scales (E1TM32 groups with different E in one 256 block): lossy only when asked
    _refused(_cli("export", runs / "wide", "--to", "gguf", out, "--type", "tq2_0"), "more than one scale",
             "--grid 256", "--allow-lossy")
    assert not out.exists()
    r = _ok(_cli("export", runs / "wide", "--to", "gguf", out, "--type", "tq2_0", "--allow-lossy", "--json"))
    doc = json.loads(r.output)
    assert not doc["exact"] and any(t["rel_l2"] > 0 for t in doc["tensors"])
    # an existing output: refused unless --force, and left alone
    before = out.read_bytes()
    _refused(_cli("export", runs / "fused", "--to", "gguf", out), "exists", "--force")
    assert out.read_bytes() == before
    _ok(_cli("export", runs / "fused", "--to", "gguf", out, "--force"))
    assert out.read_bytes() != before
    (tmp_path / "hfdir").mkdir()
    _refused(_cli("export", runs / "fused", "--to", "hf", tmp_path / "hfdir"), "exists", "--force")
    # a float-baseline run: float types only, no e1tm
    _refused(_cli("export", runs / "fp32", "--to", "gguf", tmp_path / "f.gguf", "--type", "tq1_0"),
             "float-baseline", "f32")
    _refused(_cli("export", runs / "fp32", "--to", "e1tm", tmp_path / "f.e1tm"), "float-baseline")
    doc = json.loads(_ok(_cli("export", runs / "fp32", "--to", "gguf", tmp_path / "f.gguf", "--json")).output)
    assert doc["exact"] and {t["dtype"] for t in doc["tensors"]} == {"f32"}
    doc = json.loads(_ok(_cli("export", runs / "fp32", "--to", "hf", tmp_path / "fhf", "--json")).output)
    assert doc["exact"] and doc["dtype"] == "float32"
    # a run of the old gelu MLP: no standard architecture; e1tm suggested
    ck = store.open_checkpoint(runs / "fused")
    old = replace(ck, meta={**ck.meta, "model": {**ck.meta["model"], "mlp": "gelu"}}, path=None)
    store.save_checkpoint(tmp_path / "gelu", old, step=4)
    _refused(_cli("export", tmp_path / "gelu", "--to", "hf", tmp_path / "g"), "gelu", "--to e1tm")
    assert not (tmp_path / "g").exists() and not (tmp_path / "f.e1tm").exists()
    _no_tmp(tmp_path)
    # usage errors: exit 2
    assert _cli("export", runs / "fused", "--to", "onnx", out).exit_code == 2
    assert _cli("export", runs / "fused", "--to", "gguf", out, "--type", "q3_k").exit_code == 2


def test_training_with_fuse_grid_ends_as_an_exact_tq_model(text, tmp_path):
    """arbs train --fuse-grid 256: the fuse phase fuses onto the 256-weight grid, so the trained model IS the
    TQ1_0 model (every weight tensor of the default export tq1_0, exact); a resume keeps the grid; bad grids
    and a rule without a fuse phase are refused before anything is written."""
    run = tmp_path / "run"
    grid = ["--preset", "small", "--context", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
            "--fuse-phase", "0.5", "--fuse-grid", "256", "--data", text]
    _ok(_cli("train", "--steps", 2, "--out", run, *grid))
    _ok(_cli("train", "--resume", "--steps", 3, "--out", run))
    ck = store.open_checkpoint(run)
    assert ck.step_counter == 3 and ck.meta["config"]["fuse_grid"] == 256
    for name, t in ck.tensors.items():
        E = t.arrays["E"]
        per_block = E.reshape(E.shape[0], -1, 256 // ck.gs)  # (rows, blocks, groups per block)
        assert (per_block == per_block[..., :1]).all(), name
        assert not t.arrays["corr_accum"].any(), name
    rep = ex.export(run, tmp_path / "m.gguf", to="gguf", fuse=True)
    types = {t.dtype for t in rep.tensors if len(t.shape) == 2}
    assert types == {"tq1_0"} and all(t.exact for t in rep.tensors)
    _refused(_cli("train", "--steps", 2, "--fuse-grid", 48, "--out", tmp_path / "b1"), "--fuse-grid 48", "multiple of 32")
    _refused(_cli("train", "--steps", 2, "--rule", "carry", "--fuse-grid", 256, "--out", tmp_path / "b2"),
             "--fuse-phase")
    _refused(_cli("train", "--steps", 2, "--format", "fp32", "--fuse-grid", 256, "--out", tmp_path / "b3"), "E1TM")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()
