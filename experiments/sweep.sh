#!/bin/bash
# usage: sweep.sh CONFIGS_FILE PARALLEL OUTDIR ; each line: NAME ARGS...
cfg=$1; par=$2; out=$3; mkdir -p $out
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
while read -r name args; do
  [ -z "$name" ] && continue
  while [ $(jobs -r | wc -l) -ge $par ]; do sleep 0.5; done
  python3 experiments/flip_lab.py $args --out $out/$name.json > $out/$name.log 2>&1 &
done < $cfg
wait
python3 - $out <<'PY'
import json,sys,glob,os
for f in sorted(glob.glob(sys.argv[1]+"/*.json")):
    r=json.load(open(f)); print(f"{os.path.basename(f)[:-5]:<22} val {r['val']:.4f} fused {r['val_fused']:.4f} {r['s']:.0f}s")
PY
