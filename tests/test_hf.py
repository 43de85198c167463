"""Hugging Face causal LMs from a local directory (arbs.models.hf): folding is exact, convert, train, eval,
generate, fuse and resume through the CLI, and every bad input refused before anything is written.

Tiny models are made here (a BPE tokenizer trained on the test's own text; Llama, Qwen2 with its biases,
GPT-2), saved with save_pretrained: nothing is downloaded (HF_HUB_OFFLINE=1).
"""

import copy
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: there is no model hub here
transformers = pytest.importorskip("transformers", reason="needs the optional extra arbs[hf] (transformers)")
tokenizers = pytest.importorskip("tokenizers", reason="needs the optional extra arbs[hf] (tokenizers)")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from arbs import data as data_mod  # noqa: E402
from arbs import store  # noqa: E402
from arbs.models import hf  # noqa: E402
from arbs_cli.main import main  # noqa: E402

VOCAB = 300
TRAIN = ["--batch-size", "2", "--context", "32", "--eval-every", "3", "--eval-batches", "2"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(r):
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["the", "model", "weights", "are", "ternary", "and", "integer", "state", "only", "def", "return",
             "ünïcode", "€", "\n", "(", ")", ":"]
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(" ".join(rng.choice(words, 5000)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tokenizer_json(text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text.read_text(encoding="utf-8")], trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok.to_str()


def _perturb_norms(model):
    """Norm gains (and LayerNorm biases) away from their init (1, 0), so folding them is not trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _save(model, d, tokenizer_json, **kw):
    model.save_pretrained(d, **kw)
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return d


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _llama(vocab=VOCAB, **kw):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **(SMALL | kw)))
    _perturb_norms(m)
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_json):
    """name -> directory: llama (fp32, untied), qwen2 (q/k/v biases, sharded: an index.json), gpt2 (Conv1D,
    LayerNorm biases, tied head), llama_tied_bf16 (bf16 weights, tied head)."""
    root = tmp_path_factory.mktemp("hf")
    out = {"llama": _save(_llama(), root / "llama", tokenizer_json)}
    torch.manual_seed(0)
    q = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=VOCAB, **SMALL))
    _perturb_norms(q)
    out["qwen2"] = _save(q, root / "qwen2", tokenizer_json, max_shard_size="40KB")
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None, eos_token_id=None))
    _perturb_norms(g)
    out["gpt2"] = _save(g, root / "gpt2", tokenizer_json)
    out["llama_tied_bf16"] = _save(_llama(tie_word_embeddings=True).to(torch.bfloat16), root / "llama_tied_bf16",
                                   tokenizer_json)
    return out


# ------------------------------------------------------------------------------------------------- reading


def test_sources_are_read_from_their_headers(models):
    q = hf.read_source(models["qwen2"])
    assert (models["qwen2"] / hf.INDEX_FILE).is_file() and len(q.weight_files) > 1
    ref = transformers.Qwen2ForCausalLM.from_pretrained(models["qwen2"], local_files_only=True)
    assert q.n_weights == sum(p.numel() for p in ref.state_dict().values())
    assert q.weight_dtypes == ("F32",)
    assert hf.read_source(models["llama_tied_bf16"]).weight_dtypes == ("BF16",)
    assert q.tokenizer_json is not None and q.default_context() == 128


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "llama_tied_bf16"])
@pytest.mark.parametrize("head", ["keep", "untie"])
def test_folding_is_exact(models, name, head):
    """Float logits before and after folding the norm gains (and LayerNorm biases) agree to 1e-5 relative;
    the float part left is exactly the biases (and, for a tied head kept, the final norm)."""
    src = hf.read_source(models[name])
    base = hf.load_pretrained(src)
    folded = copy.deepcopy(base)
    report = hf.fold_(folded, src.model_type, head=head)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=x, use_cache=False).logits
        got = folded(input_ids=x, use_cache=False).logits
    assert (got - want).norm() / want.norm() < 1e-5
    floats = set(hf.float_state(folded))
    tied = name in ("gpt2", "llama_tied_bf16")
    assert report.head == ("folded" if not tied else "kept" if head == "keep" else "untied")
    if name == "llama":
        assert floats == set()
    elif name == "qwen2":
        assert floats == {f"model.layers.{i}.self_attn.{k}_proj.bias" for i in range(2) for k in "qkv"}
    elif name == "llama_tied_bf16":
        assert floats == ({"model.norm.weight"} if head == "keep" else set())
    else:  # GPT-2: every linear's bias; the final LayerNorm when the tie is kept, else the new head's bias
        lin = {f"transformer.h.{i}.{m}.bias" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")}
        extra = {"transformer.ln_f.weight", "transformer.ln_f.bias"} if head == "keep" else {"lm_head.bias"}
        assert floats == lin | extra
        assert report.conv1d == 8
    # no norm keeps a gain except the tied head's final norm
    gains = [n for n, p in folded.named_parameters() if n.endswith("norm.weight") or ".ln_" in n]
    assert set(gains) <= {"model.norm.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}


# ------------------------------------------------------------------------------------------------- data


def test_tokenized_corpus_is_cached_and_batched_by_the_byte_rule(tmp_path, text, tokenizer_json):
    tok = hf.load_tokenizer(tokenizer_json.encode())
    corpus = data_mod.load_corpus(text)
    calls = []

    def encode(pieces):
        calls.append(len(pieces))
        return hf.encoder(tok)(pieces)

    sha = hf.sha256_bytes(tokenizer_json.encode())
    a = data_mod.tokenize_corpus(corpus, encode, tokenizer_sha256=sha, vocab_size=VOCAB, cache_dir=tmp_path)
    assert a.train.dtype == np.uint16 and len(calls) == 2
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.glob("tokens-*.npy")) == ["train.npy", "val.npy"]
    b = data_mod.tokenize_corpus(corpus, encode, tokenizer_sha256=sha, vocab_size=VOCAB, cache_dir=tmp_path)
    assert len(calls) == 2  # read back from the cache, not tokenized again
    np.testing.assert_array_equal(a.train, b.train)
    assert a.info["tokens_sha256"] == b.info["tokens_sha256"] and a.info["unit"] == "token"
    assert tok.decode(a.val.tolist()) == corpus.val.tobytes().decode("utf-8", "replace")
    assert data_mod.token_dtype(70000) == np.uint32
    # the (seed, step) rule of get_batch is the bytes' for any unsigned dtype
    ids = (np.arange(5000) % 256).astype(np.uint16)
    for step in (0, 7):
        x16, y16 = data_mod.get_batch(ids, batch_size=3, context=8, seed=5, step=step)
        x8, y8 = data_mod.get_batch(ids.astype(np.uint8), batch_size=3, context=8, seed=5, step=step)
        assert torch.equal(x16, x8) and torch.equal(y16, y8)


# ------------------------------------------------------------------------------------------------- commands


def test_convert_an_hf_directory(tmp_path, models):
    run = tmp_path / "conv"
    r = _ok(_cli("convert", models["qwen2"], "--out", run))
    assert "kept float and frozen" in r.output and "6 tensors, 256 values" in r.output
    ck = store.open_checkpoint(run)
    assert ck.kind == "e1tm" and ck.step_counter == 0 and "hf.model.layers.0.self_attn.q_proj.weight" in ck.tensors
    assert sorted(ck.float_params) == sorted(f"hf.model.layers.{i}.self_attn.{k}_proj.bias" for i in range(2) for k in "qkv")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(models["qwen2"], local_files_only=True)
    np.testing.assert_array_equal(ck.float_params["hf.model.layers.1.self_attn.k_proj.bias"],
                                  ref.model.layers[1].self_attn.k_proj.bias.detach().numpy())
    assert ck.meta["hf"]["config"]["model_type"] == "qwen2" and ck.meta["converted"]["head"] == "folded"
    r = _ok(_cli("generate", run, "--prompt", "the ", "--max-bytes", "4", "--temperature", "0"))
    assert r.output.startswith("the ")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_train_eval_generate_fuse_without_the_source(tmp_path, models, text, name):
    """arbs train --model DIR, then with DIR gone: eval and generate (decoded text), fuse and eval of the fused run."""
    src = shutil.copytree(models[name], tmp_path / "model")
    run = tmp_path / "run"
    r = _ok(_cli("train", "--model", src, "--data", text, "--steps", 3, "--out", run, *TRAIN))
    assert "nats/token" in r.output
    shutil.rmtree(src)  # the run holds everything it needs
    ck = store.open_checkpoint(run)
    assert ck.meta["model"]["kind"] == "hf" and ck.meta["model"]["model_type"] == name and ck.step_counter == 3
    assert ck.meta["config"]["model"] == str(src) and ck.meta["preset"] is None
    assert ck.meta["data"]["unit"] == "token" and ck.meta["data"]["token_dtype"] == "uint16"
    assert list(run.glob("tokens-*.train.npy"))
    assert not any(a.dtype.kind == "f" for t in ck.tensors.values() for a in t.arrays.values())
    if name == "llama":
        assert ck.float_params == {}
    else:
        assert ck.float_params and all(n.endswith(".bias") or ".ln_f." in n for n in ck.float_params)
    r = _ok(_cli("eval", run, "--json", "--batch-size", 2, "--batches", 2))
    doc = json.loads(r.output)
    assert doc["unit"] == "token" and np.isfinite(doc["val_loss"])
    r = _ok(_cli("generate", run, "--prompt", "the model ", "--max-bytes", 6, "--temperature", 0))
    assert r.output.startswith("the model ") and len(r.output) > len("the model \n")
    _ok(_cli("fuse", run, "--out", tmp_path / "fused"))
    fused = json.loads(_ok(_cli("eval", tmp_path / "fused", "--json", "--batch-size", 2, "--batches", 2)).output)
    assert fused["fused"] and fused["unit"] == "token"
    assert fused["val_loss"] == pytest.approx(doc["val_loss"], rel=1e-4)  # flip's fuse phase: fusing loses nothing


def test_resume_is_bit_exact_without_the_source(tmp_path, models, text):
    """N steps == N/2 + --resume + N/2, the model directory gone before the resume."""
    src = shutil.copytree(models["llama_tied_bf16"], tmp_path / "model")
    args = ["--model", src, "--data", text, "--horizon", 4, "--fuse-phase", 0, *TRAIN]
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(_cli("train", *args, "--steps", 4, "--out", a))
    _ok(_cli("train", *args, "--steps", 2, "--out", b))
    shutil.rmtree(src)
    _ok(_cli("train", "--resume", "--steps", 4, "--out", b))
    ca, cb = store.open_checkpoint(a), store.open_checkpoint(b)
    assert ca.step_counter == cb.step_counter == 4
    assert ca.tensors.keys() == cb.tensors.keys() and set(ca.float_params) == {"hf.model.norm.weight"}
    for n, t in ca.tensors.items():
        for k, arr in t.arrays.items():
            np.testing.assert_array_equal(arr, cb.tensors[n].arrays[k], err_msg=f"{n} {k}")
    np.testing.assert_array_equal(ca.float_params["hf.model.norm.weight"], cb.float_params["hf.model.norm.weight"])
    # resuming with another model is refused, the run untouched
    before = sorted(p.name for p in b.iterdir())
    r = _cli("train", "--resume", "--steps", 6, "--out", b, "--model", models["llama"])
    assert r.exit_code == 1 and "--model" in r.output and "may not change on resume" in r.output
    assert sorted(p.name for p in b.iterdir()) == before


# ------------------------------------------------------------------------------------------------- refusals


def _fake_huge(d, cfg):
    """A directory whose safetensors file holds far more weights than any machine's memory (2**36 one-byte
    weights, 8 bytes each to convert: 512 GiB), its data a hole in a sparse file (64 GiB, none on disk)."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    n = 1 << 36
    head = json.dumps({"w": {"dtype": "U8", "shape": [1 << 18, 1 << 18], "data_offsets": [0, n]}}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + n)
    return d


@pytest.mark.parametrize("case", ["no_config", "unsupported", "vocab", "preset", "huge", "truncated", "no_tokenizer"])
def test_bad_inputs_exit_1_and_write_nothing(tmp_path, models, text, tokenizer_json, case):
    d = tmp_path / "model"
    extra = []
    if case == "no_config":
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")
        want = "holds no config.json"
    elif case == "unsupported":
        shutil.copytree(models["llama"], d)
        cfg = json.loads((d / "config.json").read_text()) | {"model_type": "bert"}
        (d / "config.json").write_text(json.dumps(cfg))
        want = "model_type 'bert'.*supported: gpt2"
    elif case == "vocab":
        _save(_llama(vocab=100), d, tokenizer_json)
        want = "token ids up to 299, but the model's embedding has 100 rows"
    elif case == "preset":
        d = models["llama"]
        extra = ["--preset", "tiny"]
        want = "--model and --preset"
    elif case == "huge":
        cfg = json.loads((models["llama"] / "config.json").read_text())
        _fake_huge(d, cfg)
        (d / "tokenizer.json").write_text(tokenizer_json)
        want = "B weights; loading, folding and converting it needs about"
    elif case == "truncated":  # a download cut short: the header lists more data than the file holds
        shutil.copytree(models["llama"], d)
        w = d / "model.safetensors"
        os.truncate(w, w.stat().st_size - 64)
        want = "model.safetensors' is not a valid safetensors file"
    else:
        shutil.copytree(models["llama"], d)
        (d / "tokenizer.json").unlink()
        want = "holds no tokenizer.json"
    out = tmp_path / "run"
    r = _cli("train", "--model", d, "--data", text, "--steps", 2, "--out", out, *extra)
    assert r.exit_code == 1, r.output
    import re

    assert re.search(want, " ".join(r.output.split())), r.output
    assert not out.exists()
    if case in ("no_config", "unsupported", "huge", "truncated"):  # convert refuses the same directories
        r = _cli("convert", d, "--out", out)
        assert r.exit_code == 1 and re.search(want, " ".join(r.output.split())), r.output
        assert not out.exists()


def test_hf_is_imported_only_when_used():
    """import arbs, arbs --help, arbs train --help: no transformers, no tokenizers."""
    code = ("import sys, arbs, arbs.training.config; from click.testing import CliRunner; from arbs_cli.main import main;"
            "r = CliRunner().invoke(main, ['train', '--help']); assert r.exit_code == 0 and '--model' in r.output;"
            "CliRunner().invoke(main, ['--help']);"
            "bad = [m for m in ('transformers', 'tokenizers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", ["fp32", "absmean"])
def test_float_baselines_train_an_hf_model(tmp_path, models, text, fmt):
    """arbs train --model DIR --format fp32/absmean: AdamW on the folded HF model (absmean: QAT of every Linear
    and Embedding); a float checkpoint, eval and resume need nothing but the run."""
    src = shutil.copytree(models["llama_tied_bf16"], tmp_path / "model")
    run = tmp_path / "run"
    r = _ok(_cli("train", "--model", src, "--format", fmt, "--data", text, "--steps", 2, "--out", run, "--json", *TRAIN))
    doc = json.loads(r.stdout)
    assert np.isfinite(doc["val_loss"]) and doc["val_loss_fused"] is None
    shutil.rmtree(src)
    ck = store.open_checkpoint(run)
    assert ck.kind == "float" and ck.meta["format"] == fmt and ck.meta["model"]["kind"] == "hf" and ck.step_counter == 2
    assert "hf.model.norm.weight" in ck.tensors and "hf.model.embed_tokens.weight" in ck.tensors
    assert all("exp_avg" in t.arrays for t in ck.tensors.values())  # every parameter trained
    e = json.loads(_ok(_cli("eval", run, "--json", "--batch-size", 2, "--batches", 2)).stdout)
    assert e["unit"] == "token" and e["kind"] == "float" and np.isfinite(e["val_loss"])
    _ok(_cli("train", "--resume", "--steps", 3, "--out", run))
    assert store.open_checkpoint(run).step_counter == 3


def test_model_refuses_other_float_baselines(tmp_path, models, text):
    r = _cli("train", "--model", models["llama"], "--format", "learned-s", "--data", text, "--steps", 2,
             "--out", tmp_path / "run")
    assert r.exit_code == 1 and "fp32, absmean" in r.output and not (tmp_path / "run").exists()


def test_compare_model_trains_every_default_entry_from_the_model(tmp_path, models, text):
    """arbs compare --model DIR: fp32, absmean, E1TM32:carry, E1TM32:flip (the default), all from the model's weights."""
    out = tmp_path / "cmp"
    r = _cli("compare", "--model", models["llama"], "--data", text, "--steps", 2, "--out", out, "--json", *TRAIN)
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = json.loads(r.stdout)
    assert [d["label"] for d in doc] == ["fp32", "absmean", "E1TM32:carry", "E1TM32:carry fused", "E1TM32:flip",
                                         "E1TM32:flip fused"]
    assert all(np.isfinite(d["val_loss"]) for d in doc) and doc[0]["ratio_fp32"] == pytest.approx(1.0)
    for slug in ("fp32", "absmean", "E1TM32-carry", "E1TM32-flip"):
        ck = store.open_checkpoint(out / slug)
        assert ck.meta["model"]["kind"] == "hf" and ck.meta["config"]["model"] == str(models["llama"])
    md = (out / "compare.md").read_text()
    assert "nats/token" in md and f"model `{models['llama']}`" in md
