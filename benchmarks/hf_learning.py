"""HF learning benchmark (issue 14 item 4): make a small pretrained Llama here, then fine-tune it four ways.

No pretrained model can be downloaded, so this script makes one, measured end to end on the CPU:

1. a byte-level BPE tokenizer (``tokenizers``, vocab 4096) trained on the train split of the built-in corpus
   (``arbs.data.default_corpus()``: the Python standard library's sources; the validation split is never seen);
2. a ``transformers.LlamaForCausalLM`` (default: hidden 256, 4 layers, 4 heads, intermediate 688, 256
   positions, untied head: about 5.3M parameters) trained in float32 with AdamW for ``--pretrain-steps``
   steps on that split, tokenized as arbs tokenizes it (batch 16 x context 128, windows from arbs'
   ``get_batch`` with seed ``--seed + 1``, linear warmup then cosine to 10%, gradient clipping 1.0);
3. ``save_pretrained`` into ``<out>/model`` with the tokenizer's ``tokenizer.json``;
4. ``arbs compare --model <out>/model`` at ``--steps`` equal steps, same batches for every entry: fp32 (AdamW
   on the float model itself), absmean (BitNet-style QAT), E1TM32:carry, E1TM32:flip and flip with the
   fine-tune recipe (``E1TM32:flip,K=64,reset=8``), fused rows too.

Prints the wall time of each part (and seconds per step), the table, the pretrained model's own validation
loss (no fine-tune) and the issue's targets for both flip entries: flip <= 1.05x fp32, flip better than absmean.

    python benchmarks/hf_learning.py --pretrain-steps 2000 --steps 1000 --out runs/hf_learning
    python benchmarks/hf_learning.py --pretrain-steps 20 --steps 10 --out /tmp/hf_smoke     # smoke test

Re-running with the same --out reuses the saved model (when its pretraining settings match) and resumes the
compare (finished entries are read back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # there is no model hub: everything is made here
# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: drop this script's directory
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from arbs import data as data_mod  # noqa: E402
from arbs.compare import CompareConfig, compare, render_markdown  # noqa: E402
from arbs.models import hf  # noqa: E402
from arbs.training import TrainConfig  # noqa: E402
from arbs.training.evaluate import evaluate  # noqa: E402

RECIPE = "E1TM32:flip,K=64,reset=8"  # the fine-tune recipe of docs/models.md
ENTRIES = ("fp32", "absmean", "E1TM32:carry", "E1TM32:flip", RECIPE)


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def pretrain(a, out: Path) -> tuple[Path, dict]:
    """Tokenizer, float Llama, save_pretrained; the times of each part. Reuses ``out/model`` if it matches."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_dir = out / "model"
    settings = {k: getattr(a, k) for k in ("vocab", "hidden", "layers", "heads", "intermediate", "positions",
                                           "pretrain_steps", "pretrain_lr", "batch_size", "context", "seed")}
    record = model_dir / "pretrain.json"
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        done = json.loads(record.read_text())
        print(f"reusing {model_dir} (pretrained with the same settings; its times below are from then)")
        return model_dir, done["times"]
    times = {}
    t0 = time.perf_counter()
    corpus = data_mod.default_corpus()
    text = bytes(corpus.train).decode("utf-8", "replace")
    tok = train_tokenizer(text, a.vocab)
    times["tokenizer_s"] = time.perf_counter() - t0
    print(f"tokenizer: BPE vocab {tok.get_vocab_size()} on {len(corpus.train):,} train bytes: "
          f"{times['tokenizer_s']:.1f} s", flush=True)

    t0 = time.perf_counter()
    tok_json = tok.to_str().encode()
    ids = data_mod.tokenize_corpus(corpus, hf.encoder(tok), tokenizer_sha256=hf.sha256_bytes(tok_json),
                                   vocab_size=a.vocab)
    times["tokenize_s"] = time.perf_counter() - t0
    print(f"tokenize: {len(ids.train):,} train / {len(ids.val):,} val tokens "
          f"({len(corpus.train) / len(ids.train):.2f} bytes/token): {times['tokenize_s']:.1f} s", flush=True)

    torch.manual_seed(a.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.heads, intermediate_size=a.intermediate, max_position_embeddings=a.positions,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, attention_dropout=0.0)
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params:,} parameters ({a.hidden} hidden, {a.layers} layers, {a.heads} "
          f"heads, {a.intermediate} intermediate, untied head)", flush=True)
    lm = hf.CausalLM(model, a.context)  # (logits, loss) exactly as arbs computes them
    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = min(100, max(1, a.pretrain_steps // 10))
    lm.train()
    t0 = time.perf_counter()
    for step in range(a.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.pretrain_steps, a.pretrain_lr, warmup)
        x, y = data_mod.get_batch(ids.train, batch_size=a.batch_size, context=a.context, seed=a.seed + 1, step=step)
        _, loss = lm(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, a.pretrain_steps // 20) == 0 or step == a.pretrain_steps - 1:
            el = time.perf_counter() - t0
            print(f"  pretrain step {step + 1}/{a.pretrain_steps}: loss {loss.item():.4f} nats/token "
                  f"({el / (step + 1):.3f} s/step)", flush=True)
    times["pretrain_s"] = time.perf_counter() - t0
    times["pretrain_s_per_step"] = times["pretrain_s"] / a.pretrain_steps
    t0 = time.perf_counter()
    times["pretrained_val_loss"] = evaluate(lm, ids.val, batch_size=a.batch_size, context=a.context,
                                            max_batches=a.eval_batches)
    times["eval_s"] = time.perf_counter() - t0
    print(f"pretrain: {a.pretrain_steps} steps in {times['pretrain_s']:.1f} s "
          f"({times['pretrain_s_per_step']:.3f} s/step); val loss {times['pretrained_val_loss']:.4f} nats/token",
          flush=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    (model_dir / hf.TOKENIZER_FILE).write_bytes(tok_json)
    record.write_text(json.dumps({"settings": settings, "times": times, "parameters": n_params}, indent=1))
    return model_dir, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="float32 AdamW steps making the model")
    ap.add_argument("--steps", type=int, default=1000, help="fine-tune steps of every compare entry")
    ap.add_argument("--out", default="runs/hf_learning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tune peak lr of the float entries (fp32, absmean)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: --steps / 5")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    t_all = time.perf_counter()
    model_dir, times = pretrain(a, out)

    cfg = CompareConfig(entries=ENTRIES, model=str(model_dir), out=str(out / "compare"), steps=a.steps,
                        batch_size=a.batch_size, context=a.context, seed=a.seed,
                        eval_every=a.eval_every or max(1, a.steps // 5), eval_batches=a.eval_batches,
                        lr=a.lr, warmup=min(TrainConfig.warmup, max(1, a.steps // 10)), threads=a.threads)
    def on_entry(e, i, n):
        print(f"[{i + 1}/{n}] {e.label}", flush=True)

    t0 = time.perf_counter()
    rows = compare(cfg, on_entry=on_entry)
    compare_s = time.perf_counter() - t0
    print()
    print(render_markdown(cfg, rows))
    print(f"pretrained float model, no fine-tune: val loss {times['pretrained_val_loss']:.4f} nats/token "
          f"(same windows)")
    print("\nwall time:")
    for k in ("tokenizer_s", "tokenize_s", "pretrain_s", "eval_s"):
        if k in times:
            print(f"  {k[:-2]:<10} {times[k]:8.1f} s")
    print(f"  pretrain   {times['pretrain_s_per_step']:8.3f} s/step")
    for r in rows:
        if not r.fused and r.ms_per_step is not None:
            print(f"  {r.label:<24} {r.ms_per_step / 1e3:8.3f} s/step (training steps only)")
    print(f"  compare    {compare_s:8.1f} s ({len(ENTRIES)} entries, tokenizing, evals, fuse)")
    print(f"  total      {time.perf_counter() - t_all:8.1f} s")
    by = {r.label: r.val_loss for r in rows}
    fp32 = by["fp32"]
    print("\ntargets:")
    for label in ("E1TM32:flip", "E1TM32:flip fused", RECIPE, f"{RECIPE} fused"):
        ratio = by[label] / fp32
        print(f"{'PASS' if ratio <= 1.05 else 'MISS'}  {label} / fp32 <= 1.05: {ratio:.4f}x")
        print(f"{'PASS' if by[label] < by['absmean'] else 'MISS'}  {label} < absmean: "
              f"{by[label]:.4f} vs {by['absmean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
