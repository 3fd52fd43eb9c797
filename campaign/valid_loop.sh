#!/bin/bash
# Evaluates each new snapshot of a campaign on the validation split (GMN rows only) and
# compares it with the tuned-Adam rows of earlier evaluations of the same protocol.
snaps=$1; tag=$2; shift 2; baseline="$@"
while true; do
  for f in $(ls "$snaps"/step-*.safetensors 2>/dev/null | sort -t- -k2 -n); do
    n=$(basename "$f" .safetensors); n=${n#step-}
    out=out/valid_${tag}_s$n
    [[ -f $out/results.json ]] && continue
    OMP_NUM_THREADS=1 .venv/bin/python -m l2o.evaluate --suite valid --seeds 2 --optimizers gmn \
      --gmn-weights "$f" --workers 1 --threads 1 --out "$out" --no-progress > "$out.log" 2>&1
    { echo "== $tag step $n"; .venv/bin/python -m l2o.eval.compare --baseline $baseline --candidate "$out"; } >> out/valid_${tag}.txt 2>&1
  done
  sleep 30
done
