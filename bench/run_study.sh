#!/bin/bash
# The Fashion-MNIST study exactly as run for the README's "Results" (2-core CPU, ~110 min): three invocations of
# bench/study.py, each shared by two worker processes (one per core) on the same work directory. Re-running skips
# every finished run, so it also resumes an interrupted study and re-prints/re-writes the tables and figures.
#
#   bash bench/run_study.sh [WORKDIR]      (default runs/study)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-runs/study}
OUT=bench/results
mkdir -p "$W" "$OUT/figures"
run2() {  # NAME, study arguments...
  name=$1; shift
  $PY bench/study.py --workdir "$W" --worker 1 "$@" > "$W/w1_$name.log" 2>&1 &
  $PY bench/study.py --workdir "$W" --worker 0 --out "$OUT/$name.json" --figures "$OUT/figures" "$@" \
      > "$W/w0_$name.log" 2>&1
  wait
  sed -n '/^Teacher/,$p' "$W/w0_$name.log"
}
run2 study_mlp --students mlp --settings full,subset10,noise20 --seeds 5 \
  --variants tgeo_flr1e-2,tgeo_flr1e-4,tgeo_init0.9,tgeo_center0.5,tgeo_center0.9,tgeo_mi5,tgeo_mi20,tgeo_val32,tgeo_val512,tgeo_outliers \
  --variant_settings subset10,noise20 --variant_seeds 2
run2 study_cnn_subset10 --students cnn_small --settings subset10 --seeds 5 \
  --variants tgeo_flr1e-2,tgeo_center0.9,tgeo_mi5,tgeo_outliers --variant_seeds 2
run2 study_cnn_full_noise --students cnn_small --settings full,noise20 --seeds 5 \
  --epochs full=3,noise20=3 --methods ce,kd,kd_a1.0,dist,tgeo,kd_tgeo_mean_alpha
