"""Library workflows: convert (float -> E1TM), fuse (training -> inference), summarize (inspect)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from arbs import formats
from arbs import ops, store
from arbs.convert import convert_file, convert_state_dict, load_float_state
from arbs.errors import ConfigError, CorruptStoreError, NonFiniteError, StoreNotFoundError
from arbs.fuse import fuse_checkpoint, fuse_path, checkpoint_weights
from arbs.inspect import render_text, summarize, summarize_path
from arbs.testing.states import pack_trits

SHAPES = {
    "embed.weight": (40, 24),
    "blocks.0.attn.weight": (48, 70),  # cols not a multiple of gs
    "blocks.0.norm.weight": (33,),  # 1-D
    "conv.weight": (4, 3, 5, 5),  # 4-D: viewed as (4, 75)
}


def gaussian_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tree_hash(root: Path) -> str:
    """sha256 over every file path, content and mtime below root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture
def training_run(tmp_path) -> Path:
    """A run dir holding one converted E1TM32/carry checkpoint at step 0."""
    src = tmp_path / "model.safetensors"
    from safetensors.numpy import save_file

    save_file(gaussian_state(), str(src))
    run = tmp_path / "run"
    convert_file(src, run, format="E1TM32", rule="carry")
    return run


# ------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_convert_torch_state_dict_round_trip(tmp_path, wrapper):
    sd = gaussian_state()
    obj = {k: torch.from_numpy(v) for k, v in sd.items()}
    obj["step_count"] = torch.tensor(7)  # not floating: dropped and reported
    if wrapper:
        obj = {wrapper: obj, "epoch": 3}
    src = tmp_path / "model.pt"
    torch.save(obj, src)
    report = convert_file(src, tmp_path / "run", format="E1TM32", rule="carry")
    assert {t.name for t in report.tensors} == set(SHAPES)
    assert [s.name for s in report.skipped] == ["step_count"]
    ckpt = store.open_checkpoint(tmp_path / "run")
    assert ckpt.kind == "e1tm" and ckpt.format == "E1TM32" and ckpt.rule == "carry" and ckpt.step_counter == 0
    assert not ckpt.fused
    assert "step_count" not in ckpt.tensors
    w = checkpoint_weights(ckpt)
    by_name = {t.name: t for t in report.tensors}
    for name, orig in sd.items():
        assert w[name].shape == orig.shape and w[name].dtype == np.float32
        err = rel_l2(w[name], orig)
        assert err < 0.6
        assert by_name[name].rel_l2 == pytest.approx(err, rel=1e-6)
        for arr in ckpt.tensors[name].arrays.values():
            assert arr.dtype.kind in "iu"  # integer only


def test_convert_safetensors_file_half_precision(tmp_path):
    from safetensors.torch import save_file

    sd = gaussian_state(1)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    tensors["embed.weight"] = tensors["embed.weight"].to(torch.bfloat16)
    tensors["conv.weight"] = tensors["conv.weight"].to(torch.float16)
    tensors["ids"] = torch.arange(5)
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    loaded = load_float_state(src)
    assert set(loaded) == set(SHAPES)  # the int64 tensor is dropped
    assert all(a.dtype == np.float32 for a in loaded.values())
    np.testing.assert_array_equal(loaded["embed.weight"], tensors["embed.weight"].float().numpy())
    report = convert_file(src, tmp_path / "run", format="E1TM16", rule="flip", K=4, theta=3)
    ckpt = store.open_checkpoint(Path(report.path))
    assert ckpt.format == "E1TM16" and ckpt.gs == 16 and ckpt.rule_params == {"K": 4, "theta": 3, "gain": 4, "horizon": 0, "vote_max": 3, "vote_norm": 1, "reset": 0}
    assert set(ckpt.tensors["conv.weight"].arrays) == {"T_packed", "E", "corr_accum", "flip_accum"}
    assert "ids" in [s.name for s in report.skipped]


def test_convert_state_dict_checks_arrays_against_the_table():
    sd = gaussian_state()
    ckpt, report = convert_state_dict(sd, format="E1TM32", rule="carry", K=8)
    scheme = formats.make_scheme("E1TM32", "carry", K=8)
    for name, ts in ckpt.tensors.items():
        ops.check_state(ts.arrays, ts.shape, scheme)
        t = next(r for r in report.tensors if r.name == name)
        assert t.groups == ts.arrays["E"].size
        assert rel_l2(ops.materialize(ts.arrays, ts.shape, scheme, 0), sd[name]) == pytest.approx(t.rel_l2, rel=1e-6)
    assert ckpt.path is None and ckpt.step_counter == 0 and report.skipped == ()


def test_convert_zero_groups_reported():
    w = np.zeros((2, 64), np.float32)
    w[0, :32] = 1.0
    _, report = convert_state_dict({"w": w})
    assert report.tensors[0].zero_groups == 3


def test_include_exclude_patterns():
    sd = gaussian_state()
    ckpt, report = convert_state_dict(sd, include=["blocks.*"], exclude=["*.norm.*"])
    assert set(ckpt.tensors) == {"blocks.0.attn.weight"}
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["embed.weight"] == "not matched by any include pattern"
    assert reasons["blocks.0.norm.weight"] == "excluded by pattern '*.norm.*'"
    assert ckpt.meta["converted"]["skipped"] == [s.name for s in report.skipped]
    ckpt, _ = convert_state_dict(sd, include=["conv.*", "embed.*"], exclude=["embed.*"])
    assert set(ckpt.tensors) == {"conv.weight"}


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no tensor"):
        convert_state_dict(gaussian_state(), include=["decoder.*"])
    with pytest.raises(ConfigError, match="no tensor selected"):
        convert_state_dict(gaussian_state(), exclude=["*"])


def test_nan_tensor_names_it():
    sd = gaussian_state()
    sd["blocks.0.attn.weight"][3, 5] = np.nan
    with pytest.raises(NonFiniteError, match="blocks.0.attn.weight"):
        convert_state_dict(sd)


def test_bad_format_rule_and_params():
    sd = gaussian_state()
    with pytest.raises(ConfigError, match="Did you mean 'E1TM32'"):
        convert_state_dict(sd, format="E1TM33")
    with pytest.raises(ConfigError, match="unknown update rule"):
        convert_state_dict(sd, rule="carr")
    with pytest.raises(ConfigError, match="takes no parameter K"):
        convert_state_dict(sd, rule="average", K=4)
    with pytest.raises(ConfigError, match="out of range"):
        convert_state_dict(sd, K=0)


def test_average_rule_note_and_integer_scale():
    sd = gaussian_state()
    ckpt, report = convert_state_dict(sd, rule="average")
    assert report.notes and "average" in report.notes[0]
    for ts in ckpt.tensors.values():
        assert not ts.arrays["corr_accum"].any()  # the fraction cannot be held at step 0
    _, carry = convert_state_dict(sd, rule="carry")
    assert carry.rel_l2 < report.rel_l2  # carry keeps the fractional log2 scale in corr_accum


def test_load_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        load_float_state(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="extension"):
        load_float_state(tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CorruptStoreError, match="bad.safetensors"):
        load_float_state(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(CorruptStoreError, match="bad.pt"):
        load_float_state(tmp_path / "bad.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CorruptStoreError, match="not a state dict"):
        load_float_state(tmp_path / "list.pt")


# --------------------------------------------------------------------------------------------- fuse


def test_fuse_option_b(training_run):
    before = tree_hash(training_run)
    src = store.open_checkpoint(training_run)
    report = fuse_path(training_run)
    assert tree_hash(training_run) == before  # input untouched
    out = Path(report.path)
    assert training_run.with_name("run-fused") in (out, *out.parents)
    fused = store.open_checkpoint(training_run.with_name("run-fused"))
    assert fused.fused and fused.rule is None and fused.step_counter is None
    assert fused.meta["fused_from"] == {"format": "E1TM32", "rule": "carry", "rule_params": {"K": 16}, "step_counter": 0}
    scheme = formats.make_scheme("E1TM32", "carry")
    for name, ts in fused.tensors.items():
        assert set(ts.arrays) == {"T_packed", "E"}
        assert all(a.dtype.kind in "iu" for a in ts.arrays.values())
        s = src.tensors[name]
        np.testing.assert_array_equal(ts.arrays["T_packed"], s.arrays["T_packed"])
        E_fused, _ = ops.fuse(s.arrays, s.shape, scheme, 0)
        np.testing.assert_array_equal(ts.arrays["E"], E_fused)
    assert report.groups == sum(ts.arrays["E"].size for ts in fused.tensors.values())
    # right after convert |Xi| <= 1/2 (E = rint(log2 s)), so fuse rounds back to the same E
    assert report.changed == sum(int((fused.tensors[n].arrays["E"] != src.tensors[n].arrays["E"]).sum()) for n in SHAPES)


@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
def test_fuse_counts_changed_and_clipped(make_e1tm, rule):
    src = make_e1tm([(8, 96), (5, 40)], rule=rule, step=7, seed=3)
    first = next(iter(src.tensors.values())).arrays
    lim = int(np.abs(first["corr_accum"]).max())  # random_checkpoint plants +-bound
    first["E"].flat[:2] = [127, -128]
    first["corr_accum"].flat[:2] = [lim, -lim]  # Xi near +1 / -1 (carry, flip), +-4 (average): both clip
    fused, report = fuse_checkpoint(src)
    scheme = formats.make_scheme(src.format, rule, **src.rule_params)
    num, den = scheme.xi_ratio(7)
    changed = clipped = 0
    for name, ts in src.tensors.items():
        E = ts.arrays["E"].astype(np.int64)
        wide = np.rint(E + num * ts.arrays["corr_accum"].astype(np.float64) / den)
        np.testing.assert_array_equal(fused.tensors[name].arrays["E"], np.clip(wide, -128, 127).astype(np.int8))
        changed += int((np.clip(wide, -128, 127) != E).sum())
        clipped += int(((wide < -128) | (wide > 127)).sum())
    assert report.changed == changed > 0
    assert report.clipped == clipped > 0
    store.check_checkpoint(fused)  # a valid fused checkpoint for the store


def test_fuse_refuses_fused_and_float(training_run):
    fused, _ = fuse_checkpoint(store.open_checkpoint(training_run))
    with pytest.raises(ConfigError, match="already fused"):
        fuse_checkpoint(fused)
    rep = fuse_path(training_run)
    with pytest.raises(ConfigError, match="already fused"):
        fuse_path(rep.path)
    flt = store.Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=0,
                           tensors={}, meta={"format": "fp32"}, path=None)
    with pytest.raises(ConfigError, match="convert"):
        fuse_checkpoint(flt)


def test_fuse_option_a_keeps_arrays(training_run):
    src = store.open_checkpoint(training_run)
    before = tree_hash(training_run)
    report = fuse_path(training_run, keep_accum=True)
    assert tree_hash(training_run) == before
    assert report.mode == "keep-accum"
    out = store.open_checkpoint(training_run.with_name("run-keep-accum"))
    assert not out.fused and out.rule == src.rule and out.step_counter == src.step_counter
    assert out.meta["export"] == "keep-accum"
    for name, ts in src.tensors.items():
        assert set(out.tensors[name].arrays) == set(ts.arrays)
        for k, a in ts.arrays.items():
            np.testing.assert_array_equal(out.tensors[name].arrays[k], a)


def test_fuse_in_memory_does_not_alias(training_run):
    src = store.open_checkpoint(training_run)
    E0 = {n: ts.arrays["E"].copy() for n, ts in src.tensors.items()}
    fused, _ = fuse_checkpoint(src)
    for n, ts in fused.tensors.items():
        ts.arrays["E"][...] = 0
        ts.arrays["T_packed"][...] = 0
        np.testing.assert_array_equal(src.tensors[n].arrays["E"], E0[n])
    assert src.tensors[n].arrays["T_packed"].any()


def test_fuse_out_rules(training_run, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an arbs run dir"):
        fuse_path(training_run, junk)
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="source checkpoint"):
        fuse_path(training_run, training_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = fuse_path(training_run, empty)
    assert store.open_checkpoint(empty).fused and Path(rep.path).is_relative_to(empty)


def test_fuse_changed_counts_real_moves_on_ties():
    # carry K=16, gs=4: Xi = corr/64; Xi = +1/2 rounds half to even: E=2 stays, E=3 -> 4
    T = np.ones((1, 16), np.int8)
    arrays = {"T_packed": pack_trits(T, 4), "E": np.array([[2, 3, 127, 0]], np.int8),
              "corr_accum": np.array([[32, 32, 63, 0]], np.int64)}
    ck = store.Checkpoint(kind="e1tm", format="E1TM4", gs=4, rule="carry", rule_params={"K": 16}, fused=False,
                          step_counter=1, tensors={"w": store.TensorState(name="w", shape=(1, 16), arrays=arrays)},
                          meta={})
    fused, report = fuse_checkpoint(ck)
    np.testing.assert_array_equal(fused.tensors["w"].arrays["E"], [[2, 4, 127, 0]])
    assert (report.changed, report.clipped) == (1, 1)


def test_fuse_into_existing_run_dir_adds_a_step(training_run, make_e1tm, tmp_path):
    first = fuse_path(training_run)  # run-fused/step_0
    later = tmp_path / "later"
    store.save_checkpoint(later, make_e1tm([(4, 64)], step=7))
    rep = fuse_path(later, Path(first.path).parent)  # into run-fused: adds step_7, LATEST -> step_7
    out = training_run.with_name("run-fused")
    assert [p.name for p in store.list_checkpoints(out)] == ["step_0", "step_7"]
    assert store.open_checkpoint(out).meta["fused_from"]["step_counter"] == 7
    assert Path(rep.path) == out / "step_7"
    from arbs.errors import ArbsError

    with pytest.raises(ArbsError, match="already exists"):  # step dirs are never overwritten
        fuse_path(training_run, out)


def test_fuse_step_dir_default_out_is_run_sibling(training_run):
    rep = fuse_path(training_run / "step_0")
    assert Path(rep.path) == training_run.with_name("run-fused") / "step_0"


def test_convert_refuses_non_empty_out(tmp_path, training_run):
    from safetensors.numpy import save_file

    save_file(gaussian_state(), str(tmp_path / "m.safetensors"))
    with pytest.raises(ConfigError, match="not an empty directory"):
        convert_file(tmp_path / "m.safetensors", training_run)


def test_checkpoint_weights_fused_vs_training(training_run):
    src = store.open_checkpoint(training_run)
    fused, _ = fuse_checkpoint(src)
    wf, wt = checkpoint_weights(fused), checkpoint_weights(src)
    for name, ts in fused.tensors.items():
        a = ts.arrays
        expect = ops.materialize_fused(a["T_packed"], a["E"], ts.shape, 32)
        np.testing.assert_array_equal(wf[name], expect)
        assert rel_l2(wf[name], wt[name]) < 0.3  # rounding the scale to a power of two


# -------------------------------------------------------------------------------------------- summary


def _synthetic(rows: int, cols: int, fmt: str, rule: str | None, fused: bool = False, T: np.ndarray | None = None,
               corr: np.ndarray | None = None, step: int | None = 0):
    gs = formats.variant_gs(fmt)
    if T is None:
        packed = np.full(formats.array_shape("T_packed", rows, cols, gs), 121, np.uint8)  # 121 = five zero trits
    else:
        packed = pack_trits(T, gs)
    arrays = {"T_packed": packed, "E": np.zeros(formats.array_shape("E", rows, cols, gs), np.int8)}
    if not fused:
        arrays["corr_accum"] = corr if corr is not None else np.zeros(arrays["E"].shape, np.int64)
        if "flip_accum" in formats.tensor_arrays(rule):
            arrays["flip_accum"] = np.zeros(formats.array_shape("flip_accum", rows, cols, gs), np.int8)
    params = {} if fused else formats.rule_params(rule)
    return store.Checkpoint(
        kind="e1tm", format=fmt, gs=gs, rule=None if fused else rule, rule_params=params, fused=fused,
        step_counter=None if fused else step, tensors={"w": store.TensorState(name="w", shape=(rows, cols), arrays=arrays)}, meta={},
        path=None,
    )


@pytest.mark.parametrize("rule,training", [("carry", 3.85), ("average", 3.85), ("flip", 11.85)])
def test_summarize_bpw_4096(rule, training):
    s = summarize(_synthetic(4096, 4096, "E1TM32", rule), bpw=True)
    t = s["tensors"][0]
    assert t["bpw_inference"] == pytest.approx(1.85, abs=0.01)
    assert t["bpw_training"] == pytest.approx(training, abs=0.01)
    assert s["total"]["bpw_training"] == pytest.approx(training, abs=0.01)
    assert t["bpw_theoretical_inference"] == pytest.approx(1.85)
    assert t["bpw_theoretical_training"] == pytest.approx(training)
    assert t["bytes"]["T_packed"] == 4096 * 820 and t["bytes"]["E"] == 4096 * 128
    assert t["sparsity"] == 1.0
    fused = summarize(_synthetic(4096, 4096, "E1TM32", None, fused=True))
    assert fused["tensors"][0]["bpw_inference"] == pytest.approx(1.85, abs=0.01)
    assert fused["tensors"][0]["bpw_training"] is None and fused["tensors"][0]["Xi"] is None


def test_summarize_e1tm8_fused_is_2_6():
    s = summarize(_synthetic(64, 640, "E1TM8", None, fused=True))
    assert s["total"]["bpw_inference"] == pytest.approx(2.6)


def test_summarize_sparsity_and_xi_hand_case():
    # 2 rows x 7 cols at gs=4: the 8th column of each row is padding and must not count
    T = np.array([[1, 0, -1, 0, 0, 1, 1], [0, 0, 0, 0, -1, -1, 1]], np.int8)
    corr = np.array([[16 * 4 * 3 // 4, -16 * 4 // 4], [0, 16 * 4 // 2]], np.int64)  # Xi = .75, -.25, 0, .5
    s = summarize(_synthetic(2, 7, "E1TM4", "carry", T=T, corr=corr))
    t = s["tensors"][0]
    assert t["sparsity"] == pytest.approx(7 / 14)
    assert t["Xi"] == pytest.approx({"min": -0.25, "max": 0.75, "mean_abs": 0.375, "frac_ge_half": 0.5})
    assert t["E"]["min"] == t["E"]["max"] == 0
    text = render_text(s)
    assert "E1TM4" in text and "0.500" in text


def test_summarize_average_xi_zero_at_step_0():
    corr = np.full((3, 2), 5, np.int64)
    s = summarize(_synthetic(3, 8, "E1TM4", "average", corr=corr, step=0))
    assert s["tensors"][0]["Xi"]["max"] == 0.0
    s = summarize(_synthetic(3, 8, "E1TM4", "average", corr=corr, step=10))
    assert s["tensors"][0]["Xi"]["max"] == pytest.approx(4 * 5 / (10 * 4))


def test_summarize_saved_checkpoint(training_run):
    s = summarize_path(training_run, bpw=True)
    assert s["kind"] == "e1tm" and s["format"] == "E1TM32" and s["rule"] == "carry" and s["step_counter"] == 0
    assert s["total"]["bytes_on_disk"] > 0
    assert s["total"]["weights"] == sum(int(np.prod(v)) for v in SHAPES.values())
    assert {t["name"] for t in s["tensors"]} == set(SHAPES)
    import json

    json.dumps(s, allow_nan=False)  # JSON-able as is


def test_summarize_float_checkpoint():
    w = np.ones((8, 4), np.float32)
    w[:, 0] = 0.4375  # absmean: a = mean|W| = 0.859; |W/a| = 0.509 in column 0 is within 0.05 of the 0.5 boundary
    ts = store.TensorState(name="fc.weight", shape=(8, 4), arrays={"weight": w, "exp_avg": w.copy()})
    ck = store.Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=5,
                          tensors={"fc.weight": ts}, meta={"format": "absmean"}, path=None)
    s = summarize(ck)
    assert s["kind"] == "float" and s["float_format"] == "absmean"
    assert s["tensors"][0]["deadzone"]["frac_near_boundary"] == 0.25
    assert s["tensors"][0]["dtypes"] == {"weight": "float32", "exp_avg": "float32"}
    assert s["total"]["bpw_weight"] == 32.0 and s["total"]["bpw_all"] == 64.0
    assert "deadzone trapping" in render_text(s)
