"""arbs train / eval / generate: exact resume, integer-only checkpoints, clear errors, CLI round trip."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from arbs import store
from arbs.errors import ArbsError, ConfigError, NonFiniteError
from arbs.training import TrainConfig, train
from arbs_cli.main import main
from conftest import checkpoint_arrays

SMALL = dict(preset="tiny", context=16, batch_size=2, eval_every=3, eval_batches=2, save_every=3)


def _losses(run):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in store.read_metrics(run) if "train_loss" in r]


def test_resume_from_a_mid_run_checkpoint_with_the_fuse_phase(tmp_path, text):
    """flip's default fuse phase (last 25% of --steps: scales fused and frozen): a run resumed at the same --steps from a
    checkpoint before the phase ends bit-identical to the uninterrupted run."""
    import shutil

    kw = dict(format="E1TM32", rule="flip", data=text, steps=8, **(SMALL | {"keep": None}))
    assert TrainConfig(**kw).resolved_fuse_phase == 0.25
    a, b = tmp_path / "a", tmp_path / "b"
    train(TrainConfig(out=str(a), **kw))
    b.mkdir()
    shutil.copytree(a / "step_3", b / "step_3")
    (b / "LATEST").write_text("step_3\n")
    train(TrainConfig(out=str(b), resume=True, **kw))
    sa, sb = checkpoint_arrays(a), checkpoint_arrays(b)
    assert sa[0] == sb[0] == 8
    for k in sa[1]:
        np.testing.assert_array_equal(sa[1][k], sb[1][k], err_msg=str(k))


@pytest.mark.parametrize("fmt,rule,params", [("E1TM32", "flip", {}), ("E1TM32", "flip", {"vote_norm": 1, "reset": 15}),
                                             ("E1TM16", "carry", {}), ("E1TM32", "average", {}), ("fp32", None, {})])
def test_resume_is_bit_exact(tmp_path, text, fmt, rule, params):
    # the fuse phase is the last fraction of --steps, so a 3-step run has its own phase: split
    # runs compare without one (test_resume_from_a_mid_run_checkpoint_with_the_fuse_phase covers it)
    a, b = tmp_path / "a", tmp_path / "b"
    # flip's vote schedule ends at --horizon (default --steps): one schedule for both runs
    kw = dict(format=fmt, rule=rule, data=text, **SMALL, **params) | ({"fuse_phase": 0.0} if rule else {})
    kw |= {"horizon": 6} if rule == "flip" else {}
    train(TrainConfig(steps=6, out=str(a), **kw))
    train(TrainConfig(steps=3, out=str(b), **kw))
    train(TrainConfig(steps=6, out=str(b), resume=True, **kw))
    sa, sb = checkpoint_arrays(a), checkpoint_arrays(b)
    assert sa[0] == sb[0] == 6
    assert sa[1].keys() == sb[1].keys()
    for k in sa[1]:
        np.testing.assert_array_equal(sa[1][k], sb[1][k], err_msg=str(k))
    assert _losses(a) == _losses(b)


def test_e1tm_checkpoint_holds_only_integers_and_reports_fuse_gap(tmp_path, text):
    res = train(TrainConfig(format="E1TM32", data=text, steps=3, out=str(tmp_path / "r"), **SMALL))
    ck = store.open_checkpoint(tmp_path / "r")
    assert ck.kind == "e1tm" and ck.rule == "flip"
    for t in ck.tensors.values():
        for name, a in t.arrays.items():
            assert a.dtype.kind in "iu", (t.name, name, a.dtype)
    for zjson in (tmp_path / "r" / "step_3").rglob("zarr.json"):
        meta = json.loads(zjson.read_text())
        if meta.get("node_type") == "array":
            assert not meta["data_type"].startswith(("float", "bfloat")), zjson
    assert res.fuse_gap == pytest.approx(res.val_loss_fused - res.val_loss)


def test_fuse_phase_changes_training_but_not_the_format(tmp_path, text):
    a = train(TrainConfig(format="E1TM32", rule="carry", data=text, steps=6, out=str(tmp_path / "a"), **SMALL))
    b = train(TrainConfig(format="E1TM32", rule="carry", data=text, steps=6, fuse_phase=0.5, out=str(tmp_path / "b"), **SMALL))
    sa, sb = checkpoint_arrays(tmp_path / "a"), checkpoint_arrays(tmp_path / "b")
    assert any(not np.array_equal(sa[1][k], sb[1][k]) for k in sa[1]), "the fuse phase must change what is learned"
    assert a.fuse_gap is not None and b.fuse_gap is not None


def test_fuse_phase_fuses_the_scales_so_the_gap_is_zero(tmp_path, text):
    """flip's default phase fuses every scale into E at its start and freezes them: the trained model is
    the fused one, bit for bit, so the fuse gap is exactly 0 and corr_accum is 0 at the end."""
    res = train(TrainConfig(format="E1TM32", data=text, steps=8, out=str(tmp_path / "r"), **SMALL))
    assert res.fuse_gap == 0.0 and res.val_loss == res.val_loss_fused
    ck = store.open_checkpoint(tmp_path / "r")
    assert ck.rule_params == {"K": 16, "theta": 16, "gain": 4, "horizon": 8, "vote_max": 3, "vote_norm": 1, "reset": 0}
    assert all(not t.arrays["corr_accum"].any() for t in ck.tensors.values())


def test_resume_keeps_the_runs_own_rule_parameters(tmp_path, text):
    """A run made with other flip parameters (older defaults, say) resumes with them when the command
    names none; naming a different one is refused and leaves the run as it was."""
    kw = dict(format="E1TM32", data=text, out=str(tmp_path / "r"), **SMALL)
    train(TrainConfig(steps=3, K=8, theta=8, vote_max=1, **kw))
    train(TrainConfig(steps=5, resume=True, **kw))
    ck = store.open_checkpoint(tmp_path / "r")
    assert ck.step_counter == 5 and ck.rule_params == {"K": 8, "theta": 8, "gain": 4, "horizon": 3, "vote_max": 1, "vote_norm": 1, "reset": 0}
    with pytest.raises(ConfigError, match="rule_params"):
        train(TrainConfig(steps=6, resume=True, theta=12, **kw))
    assert store.open_checkpoint(tmp_path / "r").step_counter == 5


def test_resume_with_a_longer_horizon_extends_a_flip_run(tmp_path, text):
    """Past its --horizon a flip run's trits are final: resuming to more steps warns and moves none.
    --resume --horizon N restarts the schedule toward N (the one rule parameter a resume may change),
    records it, and the trits learn again; any other parameter is still refused."""
    run = tmp_path / "r"
    args = ["train", "--format", "E1TM16", "--data", text, "--context", "16", "--batch-size", "2",
            "--eval-every", "4", "--eval-batches", "1", "--save-every", "4", "--keep", "9", "--theta", "2"]
    r = CliRunner().invoke(main, [*args, "--steps", "4", "--out", str(run)])
    assert r.exit_code == 0, r.output
    shutil.copytree(run, tmp_path / "r2")

    def trits(path):
        return {n: t.arrays["T_packed"] for n, t in store.open_checkpoint(path).tensors.items()}

    r = CliRunner().invoke(main, [*args, "--steps", "8", "--resume", "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "vote schedule ended at step 4" in r.output
    ck = store.open_checkpoint(run)
    assert ck.step_counter == 8 and ck.rule_params["horizon"] == 4
    before, after = trits(run / "step_4"), trits(run)
    assert all(np.array_equal(before[n], after[n]) for n in before), "trits moved past the horizon"

    r = CliRunner().invoke(main, [*args, "--steps", "8", "--horizon", "8", "--resume", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 0, r.output
    assert "vote schedule ended" not in r.output
    ck = store.open_checkpoint(tmp_path / "r2")
    assert ck.step_counter == 8 and ck.rule_params["horizon"] == 8
    after = trits(tmp_path / "r2")
    assert any(not np.array_equal(before[n], after[n]) for n in before), "no trit moved after the restart"

    r = CliRunner().invoke(main, [*args, "--steps", "9", "--theta", "3", "--resume", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "--theta 3 (the run's: 2)" in r.output  # both values
    assert store.open_checkpoint(tmp_path / "r2").step_counter == 8


def test_flip_options_through_the_cli(tmp_path, text):
    run = str(tmp_path / "r")
    args = ["train", "--format", "E1TM16", "--rule", "flip", "--data", text, "--steps", "4", "--context", "16",
            "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--out", run]
    r = CliRunner().invoke(main, [*args, "--gain", "0", "--horizon", "0", "--K", "4", "--vote-max", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000  # the CLI draws the run's metrics
    assert store.open_checkpoint(run).rule_params == {"K": 4, "theta": 16, "gain": 0, "horizon": 0, "vote_max": 2, "vote_norm": 1, "reset": 0}
    r = CliRunner().invoke(main, [*args, "--rule", "carry", "--gain", "2", "--out", run + "2"])
    assert r.exit_code == 1 and "rule 'carry' takes no parameter gain" in r.output
    r = CliRunner().invoke(main, [*args, "--rule", "carry", "--vote-max", "2", "--out", run + "3"])
    assert r.exit_code == 1 and "rule 'carry' takes no parameter vote_max" in r.output
    assert not (tmp_path / "r3").exists()
    r = CliRunner().invoke(main, [*args, "--vote-max", "0", "--out", run + "4"])
    assert r.exit_code == 1 and "vote_max=0 is out of range; expected 1..127" in r.output


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, text, monkeypatch):
    run = tmp_path / "r"
    train(TrainConfig(format="E1TM32", data=text, steps=3, out=str(run), **SMALL))
    before = checkpoint_arrays(run)
    import torch.nn.functional as F

    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="last good checkpoint"):
        train(TrainConfig(format="E1TM32", data=text, steps=6, out=str(run), resume=True, **SMALL))
    after = checkpoint_arrays(run)
    assert after[0] == before[0] == 3
    for k in before[1]:
        np.testing.assert_array_equal(before[1][k], after[1][k])


def test_init_from_fp32_run_converts_with_flip_by_default_or_carry(tmp_path, text):
    train(TrainConfig(format="fp32", data=text, steps=3, out=str(tmp_path / "f"), **SMALL))
    cfg = TrainConfig(format="E1TM32", data=text, steps=3, init=str(tmp_path / "f"), out=str(tmp_path / "e"), **SMALL)
    assert cfg.resolved_rule == "flip"
    train(cfg)
    assert store.open_checkpoint(tmp_path / "e").rule == "flip"
    train(TrainConfig(format="E1TM32", rule="carry", data=text, steps=3, init=str(tmp_path / "f"),
                      out=str(tmp_path / "c"), **SMALL))
    assert store.open_checkpoint(tmp_path / "c").rule == "carry"


def test_bad_inputs_are_clear_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="Did you mean 'E1TM32'"):
        TrainConfig(format="E1TM23")
    with pytest.raises(ConfigError, match="valid rules"):
        TrainConfig(rule="flop")
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ConfigError, match="float baseline"):
        TrainConfig(format="fp32", rule="carry")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ArbsError):
        train(TrainConfig(data=str(empty), steps=1, out=str(tmp_path / "x"), **SMALL))
    short = tmp_path / "short.txt"
    short.write_text("x" * 2000)
    with pytest.raises(ArbsError, match="context"):
        train(TrainConfig(data=str(short), steps=1, out=str(tmp_path / "y"), **(SMALL | {"context": 512})))
    # resume with another rule or format: refused, checkpoint untouched
    run = tmp_path / "r"
    train(TrainConfig(format="E1TM32", rule="carry", data=text, steps=3, out=str(run), **SMALL))
    before = checkpoint_arrays(run)
    with pytest.raises(ConfigError, match="rule"):
        train(TrainConfig(format="E1TM32", rule="flip", data=text, steps=6, out=str(run), resume=True, **SMALL))
    with pytest.raises(ConfigError, match="format"):
        train(TrainConfig(format="E1TM16", rule="carry", data=text, steps=6, out=str(run), resume=True, **SMALL))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(TrainConfig(format="E1TM32", rule="carry", data=text, steps=6, out=str(run), **SMALL))
    after = checkpoint_arrays(run)
    for k in before[1]:
        np.testing.assert_array_equal(before[1][k], after[1][k])
    # a float checkpoint whose shapes do not fit the model
    sd = tmp_path / "wrong.pt"
    torch.save({"wte.weight": torch.zeros(3, 3)}, sd)
    with pytest.raises(ArbsError, match="does not fit|missing"):
        train(TrainConfig(format="E1TM32", data=text, steps=1, init=str(sd), out=str(tmp_path / "z"), **SMALL))


def test_cli_train_fuse_eval_generate(tmp_path, text):
    r = CliRunner()
    run, fused = tmp_path / "run", tmp_path / "fused"
    args = ["train", "--data", text, "--steps", "3", "--context", "16", "--batch-size", "2", "--eval-every", "3",
            "--out", str(run), "--json"]
    res = r.invoke(main, args)
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads(res.stdout)
    assert doc["steps"] == 3 and doc["rule"] == "flip" and doc["fuse_gap"] is not None
    res = r.invoke(main, ["inspect", str(run), "--bpw", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["total"]["bpw_training"] > 11.8  # flip: 3.85 + 8
    assert r.invoke(main, ["fuse", str(run), "--out", str(fused)]).exit_code == 0
    for ckpt in (run, fused):
        res = r.invoke(main, ["eval", str(ckpt), "--json", "--batches", "2"])
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["val_loss"] > 0
    res = r.invoke(main, ["generate", str(fused), "--prompt", "def ", "--max-bytes", "20", "--temperature", "0"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("def ")
    again = r.invoke(main, ["generate", str(fused), "--prompt", "def ", "--max-bytes", "20", "--temperature", "0"])
    assert again.stdout == res.stdout


def test_cli_errors_exit_1_or_2(tmp_path, text):
    r = CliRunner()
    res = r.invoke(main, ["train", "--format", "E1TM23", "--out", str(tmp_path / "a")])
    assert res.exit_code == 1 and "Did you mean 'E1TM32'" in res.stderr
    res = r.invoke(main, ["train", "--steps", "abc"])
    assert res.exit_code == 2
    res = r.invoke(main, ["eval", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing" in res.stderr
    for cmd in ("train", "eval", "generate", "compare"):
        assert r.invoke(main, [cmd, "--help"]).exit_code == 0


def test_ctrl_c_saves_a_consistent_checkpoint(tmp_path, text):
    run = tmp_path / "r"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "arbs_cli.main", "train", "--data", text, "--steps", "100000", "--context", "16",
         "--batch-size", "2", "--eval-every", "100000", "--save-every", "100000", "--out", str(run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (run / "LATEST").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # a few steps past the step-0 checkpoint
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert b"interrupted" in out
    ck = store.open_checkpoint(run)
    assert ck.step_counter > 0
