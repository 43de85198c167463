"""Float baselines through the CLI, the deadzone diagnostic, and arbs compare (table, plots, resume)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from arbs import formats, store
from arbs.plots import plot_compare
from arbs.compare import CompareConfig, compare, parse_entry
from arbs.errors import ConfigError
from arbs.formats import FLOAT_FORMATS
from arbs_cli.main import main

TINY = ["--context", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("def f(x):\n    return x + 1\n" * 300)
    return str(p)


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_every_baseline_trains_through_the_cli_and_is_marked_float(tmp_path, text, fmt):
    run = tmp_path / fmt
    res = CliRunner().invoke(main, ["train", "--format", fmt, "--data", text, "--steps", "2", "--out", str(run), "--json", *TINY])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["fuse_gap"] is None and np.isfinite(doc["val_loss"])
    ck = store.open_checkpoint(run)
    assert ck.kind == "float" and ck.meta["format"] == fmt
    res = CliRunner().invoke(main, ["inspect", str(run), "--json"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["tensors"]
    weights = [r for r in rows if r["name"].endswith(".weight") and len(r["shape"]) == 2]
    if fmt == "fp32":
        assert all("deadzone" not in r for r in weights)
    else:
        for r in weights:
            d = r["deadzone"]
            assert d["frac_neg"] + d["frac_zero"] + d["frac_pos"] == pytest.approx(1.0)
            assert 0.0 <= d["frac_near_boundary"] <= 1.0


def test_float_checkpoint_is_never_taken_for_e1tm(tmp_path, text):
    run = tmp_path / "f"
    CliRunner().invoke(main, ["train", "--format", "fp32", "--data", text, "--steps", "2", "--out", str(run), *TINY])
    res = CliRunner().invoke(main, ["fuse", str(run), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "float" in res.stderr


def test_entry_syntax():
    assert parse_entry("E1TM32:carry@init").slug == "E1TM32-carry-init"
    assert parse_entry("E1TM16").rule == "flip"
    with pytest.raises(ConfigError, match="Did you mean"):
        parse_entry("absmaen")
    with pytest.raises(ConfigError, match="E1TM formats only"):
        parse_entry("fp32:carry")
    with pytest.raises(ConfigError, match="form"):
        parse_entry("E1TM32:carry:x")


def test_entry_rule_parameters():
    e = parse_entry("E1TM32:flip,K=64,reset=8")
    assert (e.slug, e.label) == ("E1TM32-flip-K64-reset8", "E1TM32:flip,K=64,reset=8")
    cfg = CompareConfig(entries=(e.label,), steps=7).train_config(e, resume=False)
    assert cfg.rule_params() == formats.rule_params("flip", K=64, reset=8, horizon=7)
    assert parse_entry("E1TM16,theta=32@init").params == (("theta", 32),)
    for bad, want in [("E1TM32:carry,theta=3", "takes no parameter theta"), ("E1TM32:flip,K=0", "out of range"),
                      ("E1TM32:flip,Kk=3", "Did you mean 'K'"), ("fp32,K=3", "E1TM formats only"),
                      ("E1TM32:flip,K=3,K=4", "twice"), ("E1TM32:flip,reset=20", "below theta"),
                      ("E1TM32:flip,K=x", "form")]:
        with pytest.raises(ConfigError, match=want):
            parse_entry(bad)


def test_compare_cli_entry_with_rule_parameters(tmp_path, text):
    """The entry's parameters reach its run: the checkpoint records them."""
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["compare", "E1TM32:flip,theta=8,reset=7", "--data", text, "--steps", "2",
                                    "--out", str(out), "--json", *TINY])
    assert res.exit_code == 0, res.stderr
    assert [r["label"] for r in json.loads(res.stdout)] == ["E1TM32:flip,theta=8,reset=7",
                                                            "E1TM32:flip,theta=8,reset=7 fused"]
    params = store.open_checkpoint(out / "E1TM32-flip-theta8-reset7").rule_params
    assert (params["theta"], params["reset"], params["K"]) == (8, 7, formats.PARAMS["K"].default)
    res = CliRunner().invoke(main, ["compare", "E1TM32:flip,vote_maxx=2", "--out", str(tmp_path / "d")])
    assert res.exit_code == 1 and "Did you mean 'vote_max'" in res.stderr and not (tmp_path / "d").exists()


@pytest.mark.slow  # a multi-entry compare, trained twice: run by .ci/run's second step (python -m pytest -m slow)
def test_compare_writes_table_and_plots_and_resumes(tmp_path, text):
    out = tmp_path / "cmp"
    cfg = CompareConfig(entries=("absmean", "E1TM32:flip", "E1TM32:carry@init"), out=str(out), data=text, steps=2,
                        context=16, batch_size=2, eval_every=1, eval_batches=1)
    rows = compare(cfg)
    plot_compare(rows, out)  # the CLI draws them; the library writes only the table
    labels = [r.label for r in rows]
    # fp32 is added (the @init entry needs it) and comes first; every E1TM entry also has a fused row
    assert labels == ["fp32", "absmean", "E1TM32:flip", "E1TM32:flip fused", "E1TM32:carry@init",
                      "E1TM32:carry@init fused"]
    assert rows[0].ratio_fp32 == pytest.approx(1.0)
    e1tm = {r.label: r for r in rows}
    assert e1tm["E1TM32:flip"].train_bpw < 12.5 < e1tm["absmean"].train_bpw
    assert e1tm["E1TM32:flip fused"].infer_bpw < 2.0
    for f in ("compare.md", "compare.json", "val_curves.png", "final_loss.png"):
        assert (out / f).stat().st_size > 100, f
    md = (out / "compare.md").read_text()
    assert "E1TM32:carry@init fused" in md
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("COMMIT")}
    again = compare(cfg)  # finished entries are read back, not retrained
    assert [r.val_loss for r in again] == [r.val_loss for r in rows]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("COMMIT")} == mtimes


def test_compare_cli(tmp_path, text):
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["compare", "fp32", "E1TM32:average", "--data", text, "--steps", "2", "--out", str(out),
                                    "--json", *TINY])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["label"] for r in doc] == ["fp32", "E1TM32:average", "E1TM32:average fused"]
    assert (out / "val_curves.png").stat().st_size > 100 and (out / "final_loss.png").stat().st_size > 100
    res = CliRunner().invoke(main, ["compare", "E1TM32:flop", "--out", str(out)])
    assert res.exit_code == 1 and "valid rules" in res.stderr


def test_table_shows_a_dash_for_an_entry_that_trained_no_step():
    """An entry found complete on disk (no step timed in this run) has ms/step None, rendered as '-'."""
    from arbs.compare import Row, render_markdown

    row = Row(label="E1TM32:flip", format="E1TM32", rule="flip", fused=False, val_loss=2.0, val_bpb=2.885,
              ratio_fp32=None, train_bpw=11.87, infer_bpw=1.87, ms_per_step=None, peak_rss_mib=500.0)
    line = next(ln for ln in render_markdown(CompareConfig(), [row]).splitlines() if ln.startswith("| E1TM32"))
    assert line.split("|")[7].strip() == "-"


@pytest.mark.parametrize("entry, want", [("learned-s", "cannot train a Hugging Face model"),
                                         ("E1TM32:flip@init", "drop '@init'")])
def test_compare_model_refuses_entries_that_cannot_take_it(tmp_path, entry, want):
    """Refused before any run starts (the model directory is not even read)."""
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["compare", entry, "--model", str(tmp_path / "no-such-model"), "--out", str(out)])
    assert res.exit_code == 1 and want in res.stderr, res.output
    assert not out.exists()


def test_compare_model_default_entries():
    assert CompareConfig(model="m").parsed() == [parse_entry(e) for e in ("fp32", "absmean", "E1TM32:carry", "E1TM32:flip")]
    assert len(CompareConfig().parsed()) == 9
