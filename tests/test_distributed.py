"""Data-parallel training (issue 16): integer vote sums over micro-batches and over torch.distributed ranks (gloo, CPU),
applied as the mean vote (the exact sum divided by the slot count, rounded by a counter-based hash).

The central property: N ranks x M micro-batches == 1 rank x N*M micro-batches, bit for bit, for every rule,
across a save at one world size and a resume at another. Multi-process parts start 2 processes (spawn, or
``python -m arbs_cli`` with torchrun's environment variables); every rank runs with one thread.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import arbs.nn as arbs_nn
from arbs import distributed, schedule, store
from arbs.errors import ConfigError
from arbs.training import train
from arbs.training.config import TrainConfig, resume_config
from arbs_cli.main import main
from conftest import checkpoint_arrays

RULES = {"average": {}, "carry": {"K": 1}, "flip": {"horizon": 4}}  # K=1: carries within a few steps; the
# flip schedule of the 4-step reference also for the runs that stop at step 2 and resume
SMALL = dict(format="E1TM32", batch_size=4, context=32, eval_every=2, eval_batches=1, save_every=2, keep=None,
             threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_arrays(a, b) -> list:
    """Arrays (tensor, array) that differ between two checkpoint_arrays results (also a step mismatch)."""
    (sa, xa), (sb, xb) = a, b
    bad = [k for k in xa if k not in xb or not np.array_equal(xa[k], xb[k])]
    return bad + (["step_counter"] if sa != sb else [])


# -- units ---------------------------------------------------------------------------------------------------

def test_wire_dtype_is_wide_enough_and_never_int16():
    assert distributed.wire_dtype(127) == torch.int8
    assert distributed.wire_dtype(128) == torch.int32  # gloo has no int16 SUM
    assert distributed.wire_dtype(2**31 - 1) == torch.int32
    assert distributed.wire_dtype(2**31) == torch.int64
    with pytest.raises(ConfigError):
        distributed.wire_dtype(2**63)


def test_slots_interleave_ranks_so_layouts_agree():
    # 2 ranks x 2 micro-batches and 1 rank x 4 cover the same slots, each once
    two = sorted(distributed.slot_of(m, r, 2) for r in range(2) for m in range(2))
    assert two == [distributed.slot_of(m, 0, 1) for m in range(4)] == [0, 1, 2, 3]
    assert distributed.slot_seed(7, 0) == 7 and distributed.slot_seed(7, 1) != 7
    assert distributed.slot_rows(8, 4, 3) == slice(6, 8)
    with pytest.raises(ConfigError, match="multiple of 3"):
        distributed.slot_rows(8, 3, 0)


def _gpt(rule, **params):
    from arbs.models.config import get_preset
    from arbs.models.gpt import GPT
    import dataclasses

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(get_preset("tiny"), context=16))
    return arbs_nn.ternarize_(model, "E1TM32", rule, seed=5, **params)


def _train_nn(model, steps, micro, *, votes):
    """``steps`` steps of 4 sequences in ``micro`` micro-batches; votes: "mean", "sum" or "accumulate"."""
    for s in range(steps):
        x = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(s))
        n = 4 // micro
        with (arbs_nn.accumulate(model) if votes == "accumulate" else
              arbs_nn.micro_batches(model, mean=votes == "mean")):
            for m in range(micro):
                _, loss = model(x[m * n:(m + 1) * n, :-1], x[m * n:(m + 1) * n, 1:])
                loss.backward()
            arbs_nn.step(model)
    return arbs_nn.tensor_states(model)


# -- the mean vote ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [2, 3, 4, 7])
def test_mean_votes_round_stochastically_without_bias(slots):
    """Every residue of s / slots, positive and negative: each result is floor or ceil of s / slots, multiples
    divide exactly, and the mean over many elements is s / slots (a floor, a round-to-nearest, or draws that ignore
    the residue all fail this)."""
    n = 60_000
    for s in range(-2 * slots - 1, 2 * slots + 2):
        out = distributed.mean_votes(np.full(n, s, np.int64), slots, schedule.mean_vote_key(3, 1, 9, "trits"))
        assert out.dtype == np.int64 and out.shape == (n,)
        lo = s // slots
        assert set(np.unique(out)) <= {lo, lo + 1}, (s, np.unique(out))
        if s % slots == 0:
            assert (out == s // slots).all()
        # binomial: 5 standard deviations of the fraction rounded up
        frac = (out - lo).mean()
        p = s / slots - lo
        assert abs(frac - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12, (s, frac, p)


def test_mean_votes_are_a_pure_function_of_sum_slots_and_key():
    sums = np.arange(-40, 40, dtype=np.int64).reshape(8, 10)
    key = schedule.mean_vote_key(0, 2, 5, "scales")
    a = distributed.mean_votes(sums, 4, key)
    assert np.array_equal(a, distributed.mean_votes(sums.astype(np.int32), 4, key))  # dtype in: no matter
    assert a.shape == sums.shape and np.array_equal(sums, np.arange(-40, 40).reshape(8, 10))  # input untouched
    assert np.array_equal(distributed.mean_votes(sums, 1, key), sums)  # one slot: the plain vote
    # other draws for another step, tensor or part; never the same stream as the votes' own key
    others = [schedule.mean_vote_key(0, 2, 6, "scales"), schedule.mean_vote_key(0, 3, 5, "scales"),
              schedule.mean_vote_key(0, 2, 5, "trits"), schedule.mean_vote_key(1, 2, 5, "scales")]
    assert all(not np.array_equal(a, distributed.mean_votes(sums, 4, k)) for k in others)
    assert key != schedule.vote_key(0, 2, 5)


def _rounded(summed, slots, seed, tensor, step, part):
    return distributed.mean_votes(summed, slots, schedule.mean_vote_key(seed, tensor, step, part))


@pytest.mark.parametrize("rule,params,array,part", [
    ("average", {}, "corr_accum", "scales"),               # average: corr_accum += delta, no carry
    ("flip", {"theta": 127, "horizon": 4}, "flip_accum", "trits"),  # no counter reaches theta in one step
])
def test_a_mean_vote_step_applies_the_rounded_mean_of_the_summed_votes(rule, params, array, part):
    """One step of 4 micro-batches: the state moves by mean_votes(the plain sum's move, 4, key(seed, tensor_index,
    step, part)) in every tensor, and by at most one vote's reach."""
    torch.set_num_threads(1)

    def gpt():  # flip's counters from 0, so that no counter reaches theta 127 in one step of 4 micro-batches
        model = _gpt(rule, **params)
        for m in arbs_nn.e1tm_modules(model).values():
            if getattr(m, "flip_accum", None) is not None:
                m.flip_accum.zero_()
        return model

    start = arbs_nn.tensor_states(gpt())
    summed = _train_nn(gpt(), 1, 4, votes="sum")
    model = gpt()
    mean = _train_nn(model, 1, 4, votes="mean")
    index = {f"{n}.weight": m.tensor_index for n, m in arbs_nn.e1tm_modules(model).items()}
    reach = 32 if part == "scales" else 3  # gs; vote_max
    moved = 0
    for name, (_, a0) in start.items():
        s = summed[name][1][array].astype(np.int64) - a0[array]
        got = mean[name][1][array].astype(np.int64) - a0[array]
        want = _rounded(s, 4, 5, index[name], 0, part)
        assert np.array_equal(got, want), (name, int((got != want).sum()))
        assert np.abs(got).max() <= reach
        moved += int(np.abs(s).sum() > np.abs(got).sum())
    assert moved  # the sum moves farther than the mean: the division is applied


@pytest.mark.parametrize("rule,params", [*RULES.items(), ("flip", {"gain": 0})])
def test_mean_and_sum_differ_with_several_micro_batches(rule, params):
    torch.set_num_threads(1)
    a = _train_nn(_gpt(rule, **params), 2, 2, votes="mean")
    b = _train_nn(_gpt(rule, **params), 2, 2, votes="sum")
    assert any(not np.array_equal(a[n][1][k], b[n][1][k]) for n in a for k in a[n][1])


@pytest.mark.parametrize("rule,params", [*RULES.items(), ("flip", {"gain": 0}),
                                         ("flip", {"gain": 1024, "vote_max": 127, "theta": 5}),
                                         ("flip", {"theta": 4, "reset": 3, "vote_norm": 1})])
def test_one_micro_batch_of_vote_sums_is_the_plain_vote(rule, params):
    """The cut between 'votes of a micro-batch' and 'apply the summed votes' changes nothing for one micro-batch
    (vote_max 127 included: the scratch vote may move a trit there)."""
    torch.set_num_threads(1)
    plain = _train_nn(_gpt(rule, **params), 3, 1, votes="accumulate")
    for votes in ("mean", "sum"):
        counted = _train_nn(_gpt(rule, **params), 3, 1, votes=votes)
        for name, (_, arrays) in plain.items():
            for k, a in arrays.items():
                assert np.array_equal(a, counted[name][1][k]), (votes, name, k)


def test_vote_sums_differ_from_one_vote_on_the_summed_gradient():
    torch.set_num_threads(1)
    a = _train_nn(_gpt("flip"), 2, 2, votes="mean")
    b = _train_nn(_gpt("flip"), 2, 2, votes="accumulate")
    assert any(not np.array_equal(a[n][1][k], b[n][1][k]) for n in a for k in a[n][1])


def test_save_refuses_unapplied_vote_counts(tmp_path):
    model = _gpt("carry")
    with arbs_nn.micro_batches(model):
        x = torch.randint(0, 256, (2, 17))
        model(x[:, :-1], x[:, 1:])[1].backward()
        with pytest.raises(ConfigError, match="arbs.nn.step"):
            arbs_nn.save(model, tmp_path / "run")


# -- two ranks (spawned, gloo) -----------------------------------------------------------------------------

def _worker(rank, world, port, root, text):
    """Each rank: the 2-rank runs of every rule (saved at step 2), then the DDP cases; results as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        for rule, params in RULES.items():
            train(TrainConfig(**SMALL, rule=rule, **params, steps=2, data=text, out=str(Path(root) / f"dp2_{rule}")))
        # DDP for the float parameters (a bias), arbs for the votes: the ranks stay identical
        torch.manual_seed(0)
        model = arbs_nn.ternarize_(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)), "E1TM32",
                                   "flip", seed=1)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for s in range(3):
            x = torch.randn(2, 16, generator=torch.Generator().manual_seed(10 * s + rank))
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            arbs_nn.step(ddp)
        arbs_nn.check_ranks(model)  # raises unless identical
        out["ddp_digest"] = arbs_nn.state_digest(model)
        # DDP over other ranks than arbs sums the votes over: refused, never a silent divergence
        groups = [dist.new_group([0]), dist.new_group([1])]
        lone = DDP(model, process_group=groups[rank])
        lone(torch.randn(2, 16)).square().mean().backward()
        try:
            arbs_nn.step(lone)
            out["lone"] = "no error"
        except ConfigError as e:
            out["lone"] = str(e)
    except Exception as e:  # reported to the test, which fails with it
        out["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(root, f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("dp")
    mp.start_processes(_worker, args=(2, _free_port(), str(root), text), nprocs=2, join=True, start_method="spawn")
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("rule", list(RULES))
def test_two_ranks_equal_one_rank_with_two_micro_batches_across_save_and_resume(two_ranks, tmp_path, text, rule):
    """2 ranks x 1 micro-batch, saved at step 2 and resumed at world size 1 to step 4 (the micro-batch count that
    keeps the run's 2 slots is taken by itself) == 1 rank x 2 micro-batches for 4 steps, bit for bit."""
    root, _ = two_ranks
    params = RULES[rule]
    ref = tmp_path / "one"
    train(TrainConfig(**SMALL, rule=rule, **params, steps=4, micro_batches=2, data=text, out=str(ref)))
    run = root / f"dp2_{rule}"
    assert not _same_arrays(checkpoint_arrays(run / "step_2"), checkpoint_arrays(ref / "step_2"))
    meta = store.open_checkpoint(run).meta
    assert meta["micro_batch_slots"] == 2 and meta["micro_batch_votes"] == "mean"
    train(resume_config(run, steps=4, threads=1))
    assert not _same_arrays(checkpoint_arrays(run / "step_4"), checkpoint_arrays(ref / "step_4"))


def test_ddp_with_arbs_votes_keeps_ranks_identical_and_other_groups_are_refused(two_ranks):
    _, out = two_ranks
    assert "error" not in out[0] and "error" not in out[1], out
    assert out[0]["ddp_digest"] == out[1]["ddp_digest"]
    for o in out:
        assert "DistributedDataParallel reduces over ranks" in o["lone"] and "arbs.nn.data_parallel" in o["lone"]


# -- faults and refusals -----------------------------------------------------------------------------------

def _rank_env(rank, world, port):
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}


def _start(rank, port, args):
    return subprocess.Popen([sys.executable, "-m", "arbs_cli", "train", *args], env=_rank_env(rank, 2, port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_rank_leaves_a_loadable_checkpoint_and_the_survivor_stops_with_a_clear_error(tmp_path, text):
    run = tmp_path / "run"
    args = ["--format", "E1TM32", "--steps", "400", "--batch-size", "4", "--context", "32", "--save-every", "2",
            "--eval-every", "1000", "--threads", "1", "--data", text, "--out", str(run), "--dist-timeout", "30"]
    port = _free_port()
    procs = [_start(r, port, args) for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not (run / "step_4" / "COMMIT").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=45)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err
    assert "rank 0 of 2" in err and "another rank died" in err and "--resume" in err, err[-2000:]
    assert waited < 35
    ck = store.open_checkpoint(run)  # the newest committed checkpoint verifies
    assert ck.step_counter >= 4


def test_ranks_with_different_configs_are_refused(tmp_path, text):
    port = _free_port()
    base = ["--format", "E1TM32", "--steps", "2", "--batch-size", "4", "--context", "32", "--threads", "1",
            "--data", text, "--out", str(tmp_path / "run"), "--dist-timeout", "30"]
    procs = [_start(0, port, [*base, "--seed", "1"]), _start(1, port, [*base, "--seed", "2"])]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 1 for p in procs), errs
    assert all("training configs differ" in e for e in errs), errs


# -- CLI ---------------------------------------------------------------------------------------------------

def test_cli_micro_batches_trains_and_resume_checks_the_slot_count(tmp_path, text):
    run = tmp_path / "run"
    args = ["train", "--format", "E1TM32", "--rule", "carry", "--batch-size", "4", "--context", "32",
            "--eval-batches", "1", "--threads", "1", "--data", text, "--out", str(run)]
    r = CliRunner().invoke(main, [*args, "--steps", "2", "--micro-batches", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 2
    assert store.open_checkpoint(run).meta["micro_batch_slots"] == 2
    r = CliRunner().invoke(main, ["train", "--out", str(run), "--resume", "--steps", "3", "--micro-batches", "4"])
    assert r.exit_code == 1 and "votes on 2 micro-batch slot(s)" in r.stderr and "--micro-batches 2" in r.stderr
    r = CliRunner().invoke(main, [*args, "--steps", "2", "--micro-batches", "3"])
    assert r.exit_code == 1 and "multiple of 3" in r.stderr


def test_a_sum_run_resumes_with_the_sum_and_a_legacy_record_without_the_rule_too(tmp_path, text, monkeypatch):
    """--micro-batch-votes sum stays the run's rule on resume, also for a run recorded when sum was the default (its
    config left the rule out; its identity, meta["micro_batch_votes"], has it)."""
    run = tmp_path / "run"
    train(TrainConfig(**SMALL, rule="carry", steps=1, micro_batches=2, micro_batch_votes="sum", data=text,
                      out=str(run)))
    assert resume_config(run, steps=2).micro_batch_votes == "sum"
    real = store.open_checkpoint

    def legacy(*args, **kwargs):
        ck = real(*args, **kwargs)
        del ck.meta["config"]["micro_batch_votes"]
        return ck

    monkeypatch.setattr(store, "open_checkpoint", legacy)
    assert resume_config(run, steps=2).micro_batch_votes == "sum"
