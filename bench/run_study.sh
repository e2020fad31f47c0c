#!/bin/bash
# The Fashion-MNIST study (second protocol: the strong committed teacher, the best validation-chosen constant α as
# the main control, the hypergradient variants) exactly as run for the README's "Results": bench/study.py
# invocations, each shared by two worker processes (one per core) on the same work directory. Re-running skips
# every finished run (read back after its config fingerprint and teacher digest are checked), so it also resumes
# an interrupted study and re-writes the tables and figures.
#
#   bash bench/run_study.sh [WORKDIR]      (default runs/study2)
#
# As run on 2026-12-01 the study grew in two passes on one work directory: first 3 seeds on the MLP and the CNN
# subset10, 2 on the CNN noise20 (17:33-19:08), then (20:07-22:05) the MLP and the CNN subset10 to 5 seeds, the
# other controls and methods, full/cnn_small and the cost runs. A pass with more seeds reads the first seeds back
# (same fingerprints), so the invocations below, which are the second pass's, give the same runs from scratch.
# The first study (3-epoch cnn_medium teacher) is docs/history/study_v1.md: `git show e97d303:bench/run_study.sh`.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-runs/study2}
OUT=bench/results
mkdir -p "$W" "$OUT/figures/study2"
run2() {  # NAME, study arguments...
  name=$1; shift
  $PY bench/study.py --workdir "$W" --teacher teachers/fmnist_cnn_medium_fc --worker 1 "$@" > "$W/w1_$name.log" 2>&1 &
  $PY bench/study.py --workdir "$W" --teacher teachers/fmnist_cnn_medium_fc --worker 0 --out "$OUT/$name.json" --figures "$OUT/figures/study2" "$@" \
      > "$W/w0_$name.log" 2>&1
  wait
  sed -n '/^Teacher/,$p' "$W/w0_$name.log"
}
GRID=kd_a0.1,kd_a0.3,kd_a0.5,kd_a0.7,kd_a0.9
CORE=ce,$GRID,kd_best,tgeo
CONTROLS=kd_tgeo_mean_alpha,kd_trainval,dist,dkd,anl_kd,rw_kd,ada_kd,wls_kd
# The MLP: every method, 5 seeds (the α grid at seed 0, then every seed at the chosen α; the contracting Neumann
# series, a secondary variant, at 2).
run2 study2_mlp --students mlp --settings subset10,noise20,full --seeds 5 --grid_seeds 1 \
    --method_seeds tgeo_implicit_eta0.01=2 \
    --methods $CORE,tgeo_unroll4,tgeo_implicit,tgeo_head_only,tgeo_implicit_eta0.01,tgeo_center,$CONTROLS
# The CNN. unroll and implicit cost ~17x and ~60-100x a KD step on XLA:CPU for a CNN (docs/benchmarks.md): on the
# CNN only one_step and head_only. subset10: 5 seeds for the main comparison, 2 for the other controls.
LESS=kd_tgeo_mean_alpha=2,dist=2,anl_kd=2,kd_trainval=2,dkd=2,rw_kd=2,ada_kd=2,wls_kd=2
run2 study2_cnn_subset10 --students cnn_small --settings subset10 --lr_grid 0.1,0.2 --seeds 5 --grid_seeds 1 \
    --method_seeds $LESS --methods $CORE,tgeo_head_only,kd_tgeo_mean_alpha,dist,anl_kd,kd_trainval,dkd,rw_kd,ada_kd,wls_kd
# full and noise20 (3 epochs, 2 seeds: a KD run takes ~4 min and a one_step run ~11 min here).
run2 study2_cnn_noise20 --students cnn_small --settings noise20 --epochs noise20=3 --lr_grid 0.1,0.2 --seeds 2 \
    --grid_seeds 1 --methods $CORE,tgeo_head_only
run2 study2_cnn_full --students cnn_small --settings full --epochs full=3 --lr_grid 0.1,0.2 --seeds 2 \
    --grid_seeds 1 --methods $CORE,tgeo_head_only
# The paper's outlier probe: 500 Gaussian-noise images with random labels appended (MLP, subset10).
run2 study2_outliers --students mlp --settings subset10 --seeds 2 --methods tgeo_outliers
# Cost, one run after another in ONE process (nothing else on the machine): full/mlp at its chosen rate and best α.
mkdir -p "${W}_cost" && ln -sfn "$(cd "$W" && pwd)/teacher_logits" "${W}_cost/teacher_logits"
$PY bench/study.py --workdir "${W}_cost" --teacher teachers/fmnist_cnn_medium_fc --worker 0 --out "$OUT/study2_cost_full_mlp.json" --students mlp \
    --settings full --lr_grid 0.05 --seeds 1 --grid_seeds 1 \
    --methods ce,kd_a0.7,anl_kd,ada_kd,wls_kd,rw_kd,dist,dkd,tgeo,tgeo_head_only,tgeo_unroll4,tgeo_implicit
# α as a detector of the flipped labels (every learned-α run of noise20).
$PY bench/alpha_label_noise.py --workdir "$W" --out "$OUT/study2_alpha_label_noise.json"
$PY bench/study_tables.py "$OUT"/study2_{mlp,cnn_subset10,cnn_noise20,cnn_full,outliers}.json
