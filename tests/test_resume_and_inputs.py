"""A run resumes as it was made; SIGTERM saves like Ctrl-C; bad options and hostile inputs are clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from arbs import data as D
from arbs import store
from arbs.errors import ConfigError
from arbs.training import TrainConfig
from arbs_cli.main import main
from conftest import checkpoint_arrays

# non-default options everywhere, so that a resume that forgot any of them would differ
RUN = ["--format", "E1TM16", "--context", "16", "--batch-size", "2", "--eval-every", "4", "--eval-batches", "1",
       "--save-every", "4", "--keep", "9", "--theta", "2", "--fuse-phase", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("def f(x):\n    return x + 1\n" * 300)
    return str(p)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_resume_with_only_resume_continues_the_run_as_made(tmp_path, text):
    run = tmp_path / "r"
    r = invoke("train", *RUN, "--data", text, "--steps", 8, "--out", run)
    assert r.exit_code == 0, r.output
    _, want = checkpoint_arrays(run / "step_8")
    cut = tmp_path / "cut"  # the same run, stopped after its step-4 checkpoint
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "step_8")
    (cut / "LATEST").write_text("step_4\n")
    r = invoke("train", "--resume", "--out", cut)  # no other option: every one comes from the run
    assert r.exit_code == 0, r.output
    step, got = checkpoint_arrays(cut)
    assert step == 8 and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    cfg = store.open_checkpoint(cut).meta["config"]
    assert (cfg["batch_size"], cfg["context"], cfg["fuse_phase"], cfg["theta"], cfg["seed"]) == (2, 16, 0, 2, 3)


def test_resume_refuses_a_changed_option_naming_both_values(tmp_path, text):
    run = tmp_path / "r"
    assert invoke("train", *RUN, "--data", text, "--steps", 4, "--out", run).exit_code == 0
    r = invoke("train", "--resume", "--out", run, "--batch-size", 3, "--fuse-phase", 0.5)
    assert r.exit_code == 1
    assert "--batch-size 3 (the run's: 2)" in r.output and "--fuse-phase 0.5 (the run's: 0" in r.output
    r = invoke("train", "--resume", "--out", run, "--steps", 6, "--eval-every", 2)  # cadence and length may change
    assert r.exit_code == 0, r.output
    assert store.open_checkpoint(run).step_counter == 6


def test_resumed_config_keeps_what_was_recorded():
    rec = TrainConfig(format="E1TM8", steps=10, batch_size=3, fuse_phase=0.0).recorded()
    cfg = TrainConfig.resumed("runs/x", rec, steps=20)
    assert (cfg.steps, cfg.batch_size, cfg.fuse_phase, cfg.horizon, cfg.resume) == (20, 3, 0.0, 10, True)
    with pytest.raises(ConfigError, match=r"--seed 1 \(the run's: 0\)"):
        TrainConfig.resumed("runs/x", rec, seed=1)


@pytest.mark.slow  # starts a real training process
def test_sigterm_saves_and_the_run_resumes(tmp_path, text):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "arbs_cli.main", "train", *RUN, "--data", text, "--steps", "100000",
           "--save-every", "100000", "--out", str(run)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (run / "step_0").exists() and time.time() < deadline:  # step 0 is saved before training
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and "interrupted, saved" in out
    step = store.open_checkpoint(run).step_counter
    assert step > 0
    r = invoke("train", "--resume", "--out", run, "--steps", step + 2)
    assert r.exit_code == 0, r.output
    assert store.open_checkpoint(run).step_counter == step + 2


@pytest.mark.parametrize("opt,value,message", [
    ("--threads", -1, "--threads must be an integer >= 1"),
    ("--seed", -1, "--seed must be an integer 0 .. "),
    ("--seed", 2**63, "--seed must be an integer 0 .. "),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--steps", -1, "--steps must be an integer >= 1"),
    ("--context", 100000, "GiB of activations per step"),
])
def test_bad_training_options_are_refused_before_anything_is_written(tmp_path, text, opt, value, message):
    run = tmp_path / "r"
    r = invoke("train", "--data", text, opt, value, "--out", run)
    assert r.exit_code == 1 and message in r.output, r.output
    assert not run.exists()


def test_eval_and_generate_refuse_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    for cmd in ("eval", "generate"):
        r = invoke(cmd, tmp_path, "--device", "cuda")
        assert r.exit_code == 1 and "no CUDA GPU" in r.output, r.output


def test_generate_takes_any_prompt_bytes_and_streams_within_a_cap(tmp_path, text):
    run = tmp_path / "r"
    assert invoke("train", *RUN, "--data", text, "--steps", 2, "--out", run).exit_code == 0
    r = CliRunner().invoke(main, ["generate", str(run), "--prompt", b"\xff\xfe".decode("utf-8", "surrogateescape"),
                                  "--max-bytes", "5", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes.startswith(b"\xff\xfe") and len(r.stdout_bytes) == 2 + 5 + 1
    r = invoke("generate", run, "--max-bytes", 10**9)
    assert r.exit_code == 1 and "--max-bytes must be an integer 0 .. " in r.output


def test_metrics_and_plot_failures_do_not_fail_the_run(tmp_path, text):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").mkdir()  # appending fails (EISDIR) at every evaluation
    (run / "loss.png").mkdir()  # and so does the plot
    r = invoke("train", *RUN, "--data", text, "--steps", 4, "--out", run)
    assert r.exit_code == 0, r.output
    assert "not in metrics.jsonl" in r.output and "loss.png not written" in r.output
    assert "done: 4 steps" in r.output and store.open_checkpoint(run).step_counter == 4


def test_data_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="not a regular file"):
            D.load_corpus(bad)


def test_a_large_corpus_file_is_mapped_not_read(tmp_path):
    f = tmp_path / "big.txt"
    f.write_bytes(bytes(range(256)) * (D.MAP_MIN_BYTES // 256 + 1))
    c = D.load_corpus(f)
    assert isinstance(c.train.base, np.memmap) or isinstance(c.train, np.memmap)
    assert len(c.train) + len(c.val) == f.stat().st_size
    x, y = D.get_batch(c.train, batch_size=2, context=8, seed=0, step=0)
    assert x.shape == (2, 8)
    npy = tmp_path / "big.npy"
    np.save(npy, np.frombuffer(f.read_bytes(), np.uint8))
    c = D.load_corpus(npy)
    assert isinstance(c.train, np.memmap) or isinstance(c.train.base, np.memmap)


def test_meta_from_another_version_is_a_clear_error(tmp_path, text):
    run = tmp_path / "r"
    assert invoke("train", *RUN, "--data", text, "--steps", 2, "--out", run).exit_code == 0
    ck = store.open_checkpoint(run)
    meta = json.loads(json.dumps(ck.meta))
    meta["model"]["rope_scaling"] = 2.0
    store.save_checkpoint(tmp_path / "other", store.Checkpoint(
        kind=ck.kind, format=ck.format, gs=ck.gs, rule=ck.rule, rule_params=ck.rule_params, fused=False,
        step_counter=ck.step_counter, tensors=ck.tensors, meta=meta))
    r = invoke("eval", tmp_path / "other")
    assert r.exit_code == 1 and "rope_scaling" in r.output and "another arbs version" in r.output


@pytest.mark.slow  # starts a real training process
def test_a_second_trainer_on_the_same_run_exits_at_once_naming_the_first(tmp_path, text):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "arbs_cli.main", "train", *RUN, "--data", text, "--steps", "100000",
           "--save-every", "100000", "--out", str(run)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "step_0").exists() and time.time() < deadline:
            time.sleep(0.2)
        t0 = time.perf_counter()
        r = invoke("train", "--resume", "--out", run)
        assert r.exit_code == 1 and f"pid {p.pid}" in r.output, r.output
        assert time.perf_counter() - t0 < 30  # at once, not after the first one ends
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    assert p.returncode == 0
    r = invoke("train", "--resume", "--out", run, "--steps", store.open_checkpoint(run).step_counter + 1)
    assert r.exit_code == 0, r.output  # the lock went with its holder


def test_convert_takes_float8_and_sparse_and_skips_meta_tensors(tmp_path):
    import torch

    from arbs.convert import convert_file

    w = torch.randn(8, 32)
    sd = {"a.weight": w.to(torch.float8_e4m3fn), "b.weight": w.to_sparse(), "c.weight": torch.empty(8, 32, device="meta"),
          "d.weight": w}
    torch.save(sd, tmp_path / "m.pt")
    report = convert_file(tmp_path / "m.pt", tmp_path / "run", format="E1TM32", rule="carry")
    assert sorted(t.name for t in report.tensors) == ["a.weight", "b.weight", "d.weight"]
    assert [s.name for s in report.skipped] == ["c.weight"] and "meta" in report.skipped[0].reason
    ck = store.open_checkpoint(tmp_path / "run")
    for k in ("T_packed", "E"):  # the sparse copy of d converts to the same integers as d itself
        assert np.array_equal(ck.tensors["b.weight"].arrays[k], ck.tensors["d.weight"].arrays[k])


def test_fuse_out_inside_the_source_checkpoint_is_refused(tmp_path, text):
    run = tmp_path / "r"
    assert invoke("train", *RUN, "--data", text, "--steps", 2, "--out", run).exit_code == 0
    for out in (run / "step_2" / "fused", run / "step_2"):
        r = invoke("fuse", run, "--out", out)
        assert r.exit_code == 1 and "source checkpoint" in r.output, r.output
    assert store.open_checkpoint(run, verify=True).step_counter == 2
