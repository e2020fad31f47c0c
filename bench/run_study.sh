#!/bin/bash
# The Fashion-MNIST study (second protocol: the strong committed teacher, the best validation-chosen constant α as
# the main control, the hypergradient variants) exactly as run for the README's "Results": bench/study.py
# invocations, each shared by two worker processes (one per core) on the same work directory. Re-running skips
# every finished run (read back after its config fingerprint and teacher digest are checked), so it also resumes
# an interrupted study and re-writes the tables and figures.
#
#   bash bench/run_study.sh [WORKDIR]      (default runs/study2)
#
# The first study (3-epoch cnn_medium teacher) is docs/history/study_v1.md: `git show e97d303:bench/run_study.sh`.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-runs/study2}
OUT=bench/results
mkdir -p "$W" "$OUT/figures/study2"
run2() {  # NAME, study arguments...
  name=$1; shift
  $PY bench/study.py --workdir "$W" --worker 1 "$@" > "$W/w1_$name.log" 2>&1 &
  $PY bench/study.py --workdir "$W" --worker 0 --out "$OUT/$name.json" --figures "$OUT/figures/study2" "$@" \
      > "$W/w0_$name.log" 2>&1
  wait
  sed -n '/^Teacher/,$p' "$W/w0_$name.log"
}
GRID=kd_a0.1,kd_a0.3,kd_a0.5,kd_a0.7,kd_a0.9
MLP_CORE=ce,$GRID,kd_best,tgeo,tgeo_unroll4,tgeo_implicit,tgeo_head_only
CNN_CORE=ce,$GRID,kd_best,tgeo,tgeo_head_only
MLP=(--students mlp --settings subset10,noise20,full --seeds 3 --grid_seeds 1)
CNN_SUB=(--students cnn_small --settings subset10 --lr_grid 0.1,0.2 --seeds 3 --grid_seeds 1)
CNN_FULL=(--students cnn_small --settings noise20,full --epochs full=3,noise20=3 --lr_grid 0.1,0.2 --seeds 2 --grid_seeds 1)
# First the main comparison on all six pairs (the α grid at seed 0, then every seed at the chosen α): CE, the α
# grid, the best constant α, the hypergradients; 3 seeds, 2 for the CNN on the full training part (compute).
# unroll and implicit cost ~17x and ~60-100x a KD step on XLA:CPU for a CNN (docs/benchmarks.md): on the CNN only
# on subset10, 2 seeds, last.
run2 study2_mlp "${MLP[@]}" --methods $MLP_CORE
run2 study2_cnn_subset10 "${CNN_SUB[@]}" --methods $CNN_CORE
run2 study2_cnn_full_noise "${CNN_FULL[@]}" --methods $CNN_CORE
# Then the other controls and methods (the runs above are read back into the same tables).
run2 study2_mlp "${MLP[@]}" --methods $MLP_CORE,tgeo_center,kd_tgeo_mean_alpha,kd_trainval,dist,dkd,anl_kd,rw_kd
run2 study2_cnn_subset10 "${CNN_SUB[@]}" --methods $CNN_CORE,dist,dkd,tgeo_center,kd_tgeo_mean_alpha
run2 study2_cnn_full_noise "${CNN_FULL[@]}" --methods $CNN_CORE,dist,dkd
# The paper's outlier probe (500 Gaussian-noise images with random labels appended), MLP on subset10.
run2 study2_outliers --students mlp --settings subset10 --seeds 2 --methods tgeo_outliers
# The long-horizon hypergradients on the CNN student, subset10 (2 seeds).
run2 study2_cnn_long --students cnn_small --settings subset10 --lr_grid 0.1,0.2 --seeds 2 \
  --methods tgeo_unroll4,tgeo_implicit
