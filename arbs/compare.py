"""``arbs compare``: train several schemes with identical model, data order, seed and budget; one table.

Entries are ``format[:rule][,param=value...][@init]``: ``fp32``, ``absmean``, ``E1TM32:flip``,
``E1TM32:flip,K=64,reset=8`` (rule parameters of ``formats.PARAMS``; the rest the table's defaults),
``E1TM32:carry@init`` (starts from the fp32 entry's final checkpoint, which is trained first). Each entry trains in its own
subprocess (so its peak RSS is its own) into ``<out>/<slug>/``; an interrupted compare resumes: a finished
entry is read back, a partial one continues with ``--resume``. Results go to ``<out>/compare.md``,
``compare.json``, ``val_curves.png`` and ``final_loss.png``.

With ``model`` (``arbs compare --model HF_DIR``) every entry trains that local Hugging Face model, from its
own weights (arbs.models.hf): the float baselines of ``HF_FLOAT_FORMATS`` (fp32: AdamW on the model itself;
absmean: BitNet-style QAT) and any E1TM rule; default entries ``MODEL_ENTRIES``. ``@init`` entries and the
other float baselines are refused (every entry already starts from the model). Losses are then per token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing as mp
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import formats
from .errors import ArbsError, ConfigError
from .training import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_ENTRIES = (
    "fp32", "learned-s", "absmean", "factorized", "absmax-group",
    "E1TM32:average", "E1TM32:carry", "E1TM32:flip", "E1TM32:flip@init",
)
MODEL_ENTRIES = ("fp32", "absmean", "E1TM32:carry", "E1TM32:flip")  # the default with --model
_ENTRY = re.compile(r"^(?P<format>[A-Za-z0-9_-]+)(?::(?P<rule>[a-z]+))?(?P<params>(?:,[A-Za-z_]+=-?[0-9]+)*)"
                    r"(?P<init>@init)?$")


@dataclass(frozen=True)
class Entry:
    format: str
    rule: str | None
    init: bool
    params: tuple[tuple[str, int], ...] = ()  # the rule parameters the entry sets, in the order given

    @property
    def slug(self) -> str:
        return (self.format + (f"-{self.rule}" if self.rule else "") + "".join(f"-{k}{v}" for k, v in self.params)
                + ("-init" if self.init else ""))

    @property
    def label(self) -> str:
        return (self.format + (f":{self.rule}" if self.rule else "") + "".join(f",{k}={v}" for k, v in self.params)
                + ("@init" if self.init else ""))


def parse_entry(text: str) -> Entry:
    m = _ENTRY.match(text.strip())
    if not m:
        raise ConfigError(f"compare entry {text!r} is not of the form format[:rule][,param=value...][@init], e.g. "
                          "E1TM32:carry@init or E1TM32:flip,K=64,reset=8")
    fmt, rule, init = m["format"], m["rule"], bool(m["init"])
    params = tuple((k, int(v)) for k, v in (kv.split("=") for kv in m["params"].split(",")[1:]))
    formats.check_format(fmt)
    if formats.is_e1tm(fmt):
        rule = rule or "flip"
        formats.rule_spec(rule)
        if len(dict(params)) < len(params):
            raise ConfigError(f"compare entry {text!r} sets a rule parameter twice")
        try:
            for k, _ in params:
                formats.lookup(formats.PARAMS, k, "rule parameter")
            formats.rule_params(rule, **dict(params))
        except ConfigError as e:
            raise ConfigError(f"compare entry {text!r}: {e}") from None
    elif rule or init or params:
        raise ConfigError(f"compare entry {text!r}: rules, their parameters and @init apply to E1TM formats only")
    return Entry(fmt, rule, init, params)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    entries: tuple[str, ...] | None = None  # None: DEFAULT_ENTRIES, or MODEL_ENTRIES with a model
    out: str = "runs/compare"
    preset: str = "tiny"
    model: str | None = None  # a local Hugging Face model directory every entry trains (exclusive with preset)
    data: str | None = None
    steps: int = 1000
    batch_size: int = 16
    context: int | None = None
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    device: str = "cpu"
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    warmup: int = TrainConfig.warmup
    baseline_threshold: float = TrainConfig.baseline_threshold
    threads: int | None = None

    @property
    def entry_texts(self) -> tuple[str, ...]:
        if self.entries is not None:
            return tuple(self.entries)
        return MODEL_ENTRIES if self.model is not None else DEFAULT_ENTRIES

    def parsed(self) -> list[Entry]:
        if not self.entry_texts:
            raise ConfigError("compare needs at least one entry")
        es = [parse_entry(e) for e in self.entry_texts]
        if self.model is not None:
            from .training.config import HF_FLOAT_FORMATS

            for e in es:
                if e.init:
                    raise ConfigError(f"compare --model: entry {e.label!r}: @init starts from the fp32 entry, but with "
                                      "--model every entry already starts from the model's weights; drop '@init'")
                if not formats.is_e1tm(e.format) and e.format not in HF_FLOAT_FORMATS:
                    raise ConfigError(f"compare --model: entry {e.label!r} cannot train a Hugging Face model; the float "
                                      f"baselines that can are {', '.join(HF_FLOAT_FORMATS)} (and every E1TM format)")
        if any(e.init for e in es) and not any(e.format == "fp32" for e in es):
            es.insert(0, Entry("fp32", None, False))  # @init entries start from the fp32 run
        # fp32 first: @init entries need it, and every ratio is to it
        return sorted(dict.fromkeys(es), key=lambda e: (e.format != "fp32", e.init))

    def train_config(self, e: Entry, resume: bool) -> TrainConfig:
        init = str(Path(self.out) / "fp32") if e.init else None
        return TrainConfig(
            format=e.format, rule=e.rule, preset=self.preset, model=self.model, data=self.data, steps=self.steps,
            batch_size=self.batch_size, context=self.context, seed=self.seed, eval_every=self.eval_every,
            eval_batches=self.eval_batches, save_every=self.steps, keep=1, out=str(Path(self.out) / e.slug),
            resume=resume, init=init, device=self.device, lr=self.lr, weight_decay=self.weight_decay,
            warmup=self.warmup, baseline_threshold=self.baseline_threshold, threads=self.threads, **dict(e.params),
        )


@dataclass
class Row:
    label: str
    format: str
    rule: str | None
    fused: bool
    val_loss: float
    val_bpb: float
    ratio_fp32: float | None
    train_bpw: float  # persistent training state, bits per weight
    infer_bpw: float  # inference bits per weight (after fuse / packing)
    ms_per_step: float | None  # None: the entry trained no step in this run (it was complete already)
    peak_rss_mib: float
    curve: list = field(default_factory=list)


def _run_entry(cfg_dict: dict, queue) -> None:
    """Subprocess body: train one entry, report progress and the result through ``queue``."""
    import resource

    from .training import train

    cfg = TrainConfig(**cfg_dict)
    try:
        res = train(cfg, on_step=lambda r: queue.put(("step", r["step"])) if r["step"] % 10 == 0 else None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
        queue.put(("done", {"val_loss": res.val_loss, "val_loss_fused": res.val_loss_fused,
                            "ms_per_step": res.ms_per_step if math.isfinite(res.ms_per_step) else None,
                            "peak_rss_mib": peak}))
    except ArbsError as e:
        queue.put(("error", f"{type(e).__name__}: {e}"))
    except BaseException as e:  # report, then let the parent decide
        queue.put(("error", f"{type(e).__name__}: {e}"))
        raise


def _train_in_subprocess(cfg: TrainConfig, on_step) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_entry, args=(dataclasses.asdict(cfg), q))
    p.start()
    result = None
    try:
        while True:
            try:
                kind, payload = q.get(timeout=1.0)
            except Exception:
                if not p.is_alive():
                    break
                continue
            if kind == "step" and on_step:
                on_step(payload)
            elif kind == "done":
                result = payload
                break
            elif kind == "error":
                raise ArbsError(f"compare entry {cfg.out}: {payload}")
    finally:
        p.join()
    if result is None:
        raise ArbsError(f"compare entry {cfg.out}: the training process ended with exit code {p.exitcode}")
    return result


def _state_bpw(ckpt) -> tuple[float, float]:
    """(persistent training bits/weight, inference bits/weight) measured from the arrays' raw bytes."""
    from . import store

    from .nn.baselines import inference_bpw

    weights = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    if ckpt.kind == "e1tm":
        train_bytes = store.array_nbytes(ckpt)
        infer_bytes = store.array_nbytes(ckpt, formats.INFERENCE_ARRAYS)
        return 8 * train_bytes / weights, 8 * infer_bytes / weights
    train_bytes = store.array_nbytes(ckpt)
    fmt = ckpt.meta["format"]
    infer_bits = sum(
        inference_bpw(fmt, cols=formats.tensor_view(t.shape)[1], gs=ckpt.meta.get("gs", 32)) * math.prod(t.shape)
        for t in ckpt.tensors.values() if len(t.shape) >= 2
    )
    big = sum(math.prod(t.shape) for t in ckpt.tensors.values() if len(t.shape) >= 2)
    return 8 * train_bytes / big, infer_bits / big


def compare(cfg: CompareConfig, *, on_entry: Callable[[Entry, int, int], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> list[Row]:
    """Train (or resume, or read back) every entry and write the table into ``cfg.out``."""
    from . import store  # imported here so that `arbs compare --help` stays lean

    entries = cfg.parsed()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[Entry, dict] = {}
    finished = {r["label"]: r for r in store.read_metrics(out) if "label" in r}  # entries done earlier
    for i, e in enumerate(entries):
        if on_entry:
            on_entry(e, i, len(entries))
        run = out / e.slug
        if e.label in finished and (run / "LATEST").exists() and store.open_checkpoint(run).step_counter == cfg.steps:
            results[e] = finished[e.label]
            continue
        resume = (run / "LATEST").exists()
        r = _train_in_subprocess(cfg.train_config(e, resume), on_step)
        r["label"] = e.label
        store.append_metrics(out, r)
        results[e] = r
    rows = _rows(cfg, entries, results)
    write_report(cfg, rows)
    return rows


def _rows(cfg: CompareConfig, entries: list[Entry], results: dict) -> list[Row]:
    from . import store

    fp32 = next((results[e]["val_loss"] for e in entries if e.format == "fp32"), None)
    rows = []
    for e in entries:
        r = results[e]
        run = Path(cfg.out) / e.slug
        ck = store.open_checkpoint(run)
        train_bpw, infer_bpw = _state_bpw(ck)
        curve = [(m["step"], m["val_loss"]) for m in store.read_metrics(run) if m.get("val_loss") is not None]
        variants = [(False, r["val_loss"])]
        if r.get("val_loss_fused") is not None:
            variants.append((True, r["val_loss_fused"]))
        for fused, loss in variants:
            rows.append(Row(
                label=e.label + (" fused" if fused else ""), format=e.format, rule=e.rule, fused=fused,
                val_loss=loss, val_bpb=loss / math.log(2), ratio_fp32=(loss / fp32) if fp32 else None,
                train_bpw=train_bpw, infer_bpw=infer_bpw, ms_per_step=r["ms_per_step"],
                peak_rss_mib=r["peak_rss_mib"], curve=[] if fused else curve,
            ))
    return rows


def render_markdown(cfg: CompareConfig, rows: list[Row]) -> str:
    unit = "token" if cfg.model is not None else "byte"
    head = (f"| scheme | val loss (nats/{unit}) | bits/{unit} | ratio to fp32 | training state bits/weight | "
            "inference bits/weight | ms/step | peak RSS MiB |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ratio = f"{r.ratio_fp32:.3f}x" if r.ratio_fp32 else "-"
        lines.append(f"| {r.label} | {r.val_loss:.4f} | {r.val_bpb:.4f} | {ratio} | {r.train_bpw:.2f} | "
                     f"{r.infer_bpw:.2f} | {'-' if r.ms_per_step is None else f'{r.ms_per_step:.1f}'} | "
                     f"{r.peak_rss_mib:.0f} |")
    what = f"model `{cfg.model}`" if cfg.model is not None else f"preset `{cfg.preset}`"
    setup = (f"{what}, {cfg.steps} steps, batch {cfg.batch_size}, seed {cfg.seed}, "
             f"data {cfg.data or 'Python stdlib corpus (default)'}, device {cfg.device}")
    notes = ("Training-state bits/weight: every persistent array of the final checkpoint, in raw bytes "
             "(float baselines: fp32 latent weight + AdamW moments). Inference bits/weight: E1TM after fuse "
             "(T_packed + E); baselines per arbs.nn.baselines.inference_bpw. Rows 'fused' evaluate the fused "
             "checkpoint (E_fused = round(E + Xi)).")
    return f"{setup}\n\n" + "\n".join(lines) + f"\n\n{notes}\n"


def write_report(cfg: CompareConfig, rows: list[Row]) -> None:
    """compare.md and compare.json in ``cfg.out`` (the CLI draws the plots from the rows)."""
    out = Path(cfg.out)
    (out / "compare.md").write_text(render_markdown(cfg, rows))
    (out / "compare.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
