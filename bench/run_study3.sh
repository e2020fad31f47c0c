#!/bin/bash
# The Fashion-MNIST study on the cnn_deep_fc teacher (the third protocol; bench/run_study.sh is the second's, on
# cnn_medium_fc): bench/study.py invocations, each shared by two worker processes (one per core) on one work
# directory, every finished run kept in the committed archive bench/results/study3_runs/ (its summary, α records
# and, on noise20, the flipped-label detection). Re-running skips every finished run, read back from the work
# directory or the archive after its config fingerprint and teacher digest are checked, so the study resumes in a
# later session or on another machine from a clean clone, and re-writes the tables and figures at the end.
#
#   bash bench/run_study3.sh [WORKDIR]      (default runs/study3)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-runs/study3}
OUT=bench/results
ARCHIVE=$OUT/study3_runs
TEACHER=(--teacher teachers/fmnist_cnn_deep_fc)
mkdir -p "$W" "$OUT/figures/study3"
run2() {  # NAME, study arguments...
  name=$1; shift
  $PY bench/study.py --workdir "$W" --archive "$ARCHIVE" "${TEACHER[@]}" --worker 1 "$@" > "$W/w1_$name.log" 2>&1 &
  $PY bench/study.py --workdir "$W" --archive "$ARCHIVE" "${TEACHER[@]}" --worker 0 --out "$OUT/$name.json" \
      --figures "$OUT/figures/study3" "$@" > "$W/w0_$name.log" 2>&1
  wait
  sed -n '/^Teacher/,$p' "$W/w0_$name.log"
}
GRID=kd_a0.1,kd_a0.3,kd_a0.5,kd_a0.7,kd_a0.9
CORE=ce,$GRID,kd_best,tgeo
CONTROLS=kd_tgeo_mean_alpha,kd_trainval,dist,dkd,anl_kd,rw_kd,ada_kd,wls_kd
# The MLP: every method, 5 seeds (the α grid at seed 0, then every seed at the chosen α; the contracting Neumann
# series, a secondary variant, at 2).
run2 study3_mlp --students mlp --settings subset10,full,noise20 --seeds 5 --grid_seeds 1 \
    --method_seeds tgeo_implicit_eta0.01=2 \
    --methods $CORE,tgeo_unroll4,tgeo_implicit,tgeo_head_only,tgeo_implicit_eta0.01,tgeo_center,$CONTROLS
# The CNN on subset10: 5 seeds for the main comparison, 2 for the other controls and for unroll / implicit / center
# (on a CNN an unrolled step costs ~17x a KD step on XLA:CPU, an implicit meta step ~60x: docs/benchmarks.md).
LESS=kd_tgeo_mean_alpha=2,dist=2,anl_kd=2,kd_trainval=2,dkd=2,rw_kd=2,ada_kd=2,wls_kd=2
LESS=$LESS,tgeo_center=2,tgeo_unroll4=2,tgeo_implicit_eta0.01_m5=2
run2 study3_cnn_subset10 --students cnn_small --settings subset10 --lr_grid 0.1,0.2 --seeds 5 --grid_seeds 1 \
    --method_seeds $LESS --methods $CORE,tgeo_head_only,tgeo_center,$CONTROLS,tgeo_unroll4,tgeo_implicit_eta0.01_m5
# full and noise20 on the CNN (3 epochs, 2 seeds: a KD run takes ~4 min and a one_step run ~11 min here).
for s in noise20 full; do
  run2 study3_cnn_$s --students cnn_small --settings $s --epochs $s=3 --lr_grid 0.1,0.2 --seeds 2 \
      --grid_seeds 1 --methods $CORE,tgeo_head_only
done
# The paper's outlier probe: 500 Gaussian-noise images with random labels appended (MLP, subset10).
run2 study3_outliers --students mlp --settings subset10 --seeds 2 --methods tgeo_outliers
# Cost, one run after another in ONE process (nothing else on the machine): full/mlp at its chosen rate and best α
# (read from study3_mlp.json). Not archived: its runs time the machine, they are not the study's results.
read -r LR ALPHA < <($PY -c "import json; r = json.load(open('$OUT/study3_mlp.json'))['results']['full/mlp'];
print(r['learning_rate'], r['best_alpha']['alpha'])")
mkdir -p "${W}_cost" && ln -sfn "$(cd "$W" && pwd)/teacher_logits" "${W}_cost/teacher_logits"
$PY bench/study.py --workdir "${W}_cost" "${TEACHER[@]}" --worker 0 --out "$OUT/study3_cost_full_mlp.json" \
    --students mlp --settings full --lr_grid "$LR" --seeds 1 --grid_seeds 1 \
    --methods ce,kd_a$ALPHA,anl_kd,ada_kd,wls_kd,rw_kd,dist,dkd,tgeo,tgeo_head_only,tgeo_unroll4,tgeo_implicit
# α as a detector of the flipped labels (every learned-α run of noise20, from the archive).
$PY bench/alpha_label_noise.py --archive "$ARCHIVE" --out "$OUT/study3_alpha_label_noise.json"
$PY bench/study_tables.py "$OUT"/study3_{mlp,cnn_subset10,cnn_noise20,cnn_full,outliers}.json
