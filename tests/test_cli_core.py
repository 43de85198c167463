"""CLI: arbs convert / fuse / inspect through click's CliRunner (exit codes, stdout JSON, stderr errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import arbs
from arbs import formats
from arbs_cli.main import COMMANDS, main

COMMAND_OBJECTS = [main.get_command(None, name) for name in COMMANDS]


@pytest.fixture
def float_file(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({
        "tok.weight": rng.standard_normal((40, 24)).astype(np.float32),
        "lin.weight": rng.standard_normal((20, 70)).astype(np.float32),
        "ln.weight": rng.standard_normal(24).astype(np.float32),
    }, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_json(result) -> dict:
    """stdout must be exactly one JSON document (json.loads rejects trailing data)."""
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_convert_takes_every_rule_parameter_of_the_table(tmp_path, float_file):
    r = invoke("convert", float_file, "--gain", 0, "--vote-max", 1, "--theta", 8, "--vote-norm", 1, "--reset", 7,
               "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.stderr
    assert one_json(r)["rule_params"] == {"K": 16, "theta": 8, "gain": 0, "horizon": 0, "vote_max": 1, "vote_norm": 1,
                                          "reset": 7}  # flip
    r = invoke("convert", float_file, "--out", tmp_path / "b", "--json")
    assert one_json(r)["rule_params"] == {n: p.default for n, p in formats.PARAMS.items()}
    r = invoke("convert", float_file, "--rule", "carry", "--gain", 2, "--out", tmp_path / "c")
    assert r.exit_code == 1 and "rule 'carry' takes no parameter gain" in r.stderr
    assert not (tmp_path / "c").exists()


def test_convert_inspect_fuse_round_trip(tmp_path, float_file):
    run = tmp_path / "run"
    r = invoke("convert", float_file, "--format", "E1TM32", "--rule", "carry", "--K", 8, "--exclude", "ln.*", "--out", run)
    assert r.exit_code == 0, r.stderr
    assert "rel_l2" in r.stdout and "lin.weight" in r.stdout and "ln.weight" in r.stdout  # ln listed as skipped
    assert "excluded by pattern" in r.stdout

    doc = one_json(invoke("inspect", run, "--bpw", "--json"))
    assert doc["format"] == "E1TM32" and doc["rule"] == "carry" and doc["rule_params"] == {"K": 8}
    assert doc["step_counter"] == 0 and doc["fused"] is False
    assert {t["name"] for t in doc["tensors"]} == {"tok.weight", "lin.weight"}
    assert doc["total"]["bpw_theoretical_training"] == pytest.approx(3.85)
    assert doc["total"]["bytes_on_disk"] > 0

    r = invoke("fuse", run)
    assert r.exit_code == 0, r.stderr
    assert "saved" in r.stdout
    fused = tmp_path / "run-fused"
    doc = one_json(invoke("inspect", fused, "--json"))
    assert doc["fused"] is True and doc["rule"] is None and doc["step_counter"] is None
    assert doc["meta"]["fused_from"]["rule"] == "carry"
    assert all(t["bpw_training"] is None for t in doc["tensors"])

    r = invoke("inspect", fused)
    assert r.exit_code == 0 and "fused" in r.stdout and "bpw(inf)" in r.stdout


def test_json_outputs_are_single_documents(tmp_path, float_file):
    run = tmp_path / "run"
    r = invoke("-v", "convert", float_file, "--out", run, "--json")
    doc = one_json(r)
    assert "INFO" in r.stderr and "INFO" not in r.stdout  # -v logs go to stderr only
    assert doc["path"] and len(doc["tensors"]) == 3 and doc["rule"] == "flip"  # formats.DEFAULT_RULE
    doc = one_json(invoke("-vv", "fuse", run, "--json", "--out", tmp_path / "f"))
    assert doc["mode"] == "fused" and doc["groups"] > 0
    doc = one_json(invoke("fuse", run, "--keep-accum", "--json"))
    assert doc["mode"] == "keep-accum"
    doc = one_json(invoke("inspect", tmp_path / "run-keep-accum", "--json"))
    assert doc["meta"]["export"] == "keep-accum" and doc["fused"] is False


def test_inspect_accepts_step_dir(tmp_path, float_file):
    run = tmp_path / "run"
    doc = one_json(invoke("convert", float_file, "--out", run, "--json"))
    step_dir = doc["path"]
    a = one_json(invoke("inspect", step_dir, "--json"))
    b = one_json(invoke("inspect", run, "--json"))
    assert a["tensors"] == b["tensors"]


def test_missing_file_exit_1(tmp_path):
    r = invoke("convert", tmp_path / "nope.safetensors", "--out", tmp_path / "run")
    assert r.exit_code == 1
    assert "does not exist" in r.stderr and r.stdout == ""
    r = invoke("inspect", tmp_path / "no-run")
    assert r.exit_code == 1 and r.stderr.startswith("Error:")


def test_convert_into_existing_run_exit_1(tmp_path, float_file):
    assert invoke("convert", float_file, "--out", tmp_path / "run").exit_code == 0
    r = invoke("convert", float_file, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "not an empty directory" in r.stderr


def test_fuse_fused_exit_1(tmp_path, float_file):
    invoke("convert", float_file, "--out", tmp_path / "run")
    assert invoke("fuse", tmp_path / "run").exit_code == 0
    r = invoke("fuse", tmp_path / "run-fused")
    assert r.exit_code == 1 and "already fused" in r.stderr


def test_unknown_format_did_you_mean(tmp_path, float_file):
    r = invoke("convert", float_file, "--format", "E1TM33", "--out", tmp_path / "run")
    assert r.exit_code == 1
    assert "Did you mean" in r.stderr and "E1TM32" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [
    ["convert", "x.safetensors"],  # --out missing
    ["convert", "x.safetensors", "--out", "r", "--K", "many"],
    ["inspect", "r", "--bogus"],
    ["fuse"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(args):
    r = invoke(*args)
    assert r.exit_code == 2, r.output


@pytest.mark.parametrize("cmd", [[]] + [[name] for name in COMMANDS])
def test_help(cmd):
    r = invoke(*cmd, "--help")
    assert r.exit_code == 0 and "Usage:" in r.stdout


def test_every_option_has_help():
    for cmd in COMMAND_OBJECTS:
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{cmd.name} {p.opts} lacks help="
        assert cmd.help and cmd.get_short_help_str()


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and arbs.__version__ in r.stdout


def test_progress_bar_and_its_lines_go_to_stderr():
    import click

    from arbs_cli.common import echo_json, progress_bar

    @click.command()
    def cmd():
        with progress_bar(total=2, disable=False) as bar:
            bar.update(1)
            bar.write("step 1 val 0.5")
        echo_json({"ok": float("nan")})

    r = CliRunner().invoke(cmd)
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {"ok": None}  # strict JSON: NaN -> null
    assert "step 1 val 0.5" in r.stderr and "step 1" not in r.stdout


def test_inspect_and_fuse_float_checkpoint(tmp_path):
    from arbs import store

    w = np.ones((8, 4), np.float32)
    w[0] = 0.0  # absmean: a = 7/8, so row 0 rounds to 0 and the rest to +1
    ck = store.Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=3,
                          tensors={"fc.weight": store.TensorState(name="fc.weight", shape=(8, 4), arrays={"weight": w})},
                          meta={"format": "absmean"})
    store.save_checkpoint(tmp_path / "flt", ck)
    doc = one_json(invoke("inspect", tmp_path / "flt", "--json"))
    assert doc["kind"] == "float" and doc["total"]["bpw_weight"] == 32.0
    dz = doc["tensors"][0]["deadzone"]
    assert (dz["frac_neg"], dz["frac_zero"], dz["frac_pos"], dz["frac_near_boundary"]) == (0.0, 0.125, 0.875, 0.0)
    r = invoke("inspect", tmp_path / "flt")
    assert r.exit_code == 0 and "deadzone trapping" in r.stdout and "0.875" in r.stdout
    r = invoke("fuse", tmp_path / "flt")
    assert r.exit_code == 1 and "only E1TM checkpoints" in r.stderr


def test_help_and_version_import_no_torch():
    """``arbs --help``/``--version`` and ``import arbs`` stay lean: no torch, zarr or numba is imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom arbs_cli.main import main\nimport arbs\n"
            "for args in (['--help'], ['--version']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'zarr', 'numba', 'triton') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
