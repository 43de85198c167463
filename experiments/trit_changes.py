"""How many trits a fine-tune moved: each run's final ternary weights against its own step-0 ternarization of
the same float model (E1TM runs: ``ops.convert`` with the run's scheme; absmean runs: ``round(W / mean|W|)``
clamped to +-1 per tensor, of the float latents), over every 2-D weight.

    HF_HUB_OFFLINE=1 python experiments/trit_changes.py --model runs/hfl_model /tmp/sw4/pA64R63 /tmp/hfl/compare/absmean
"""

from __future__ import annotations

import argparse

import numpy as np

from arbs import formats, ops, store
from arbs.models import hf


def absmean_trits(w: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / np.abs(w).mean()), -1, 1)


def changed(run: str, floats: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    ck = store.open_checkpoint(run)
    moved = total = 0
    per = {}
    for name, ts in ck.tensors.items():
        if ck.kind == "e1tm":
            cols_p = formats.padded_cols(formats.tensor_view(ts.shape)[1], ck.gs)
            T = ops.unpack(ts.arrays["T_packed"], cols_p)
            T0 = ops.unpack(ops.convert(floats[name], formats.make_scheme(ck.format, ck.rule, **ck.rule_params))[0]["T_packed"], cols_p)
        elif ts.arrays.get("weight") is not None and ts.arrays["weight"].ndim == 2:
            T, T0 = absmean_trits(ts.arrays["weight"]), absmean_trits(floats[name])
        else:
            continue
        n = int((T != T0).sum())
        moved, total = moved + n, total + floats[name].size
        per[name] = n / floats[name].size
    return moved / total, per


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the HF directory the runs fine-tuned")
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    model, _ = hf.load_folded(hf.read_source(a.model, tokenizer=False))
    floats = {n: p.detach().numpy() for n, p in model.named_parameters() if p.ndim == 2}
    for run in a.runs:
        frac, per = changed(run, floats)
        print(f"{run}: {100 * frac:.1f} % of trits moved (head {100 * per.get('hf.lm_head.weight', float('nan')):.1f} %)")


if __name__ == "__main__":
    main()
