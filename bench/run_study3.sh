#!/bin/bash
# The Fashion-MNIST study on the cnn_deep_fc teacher (the third protocol; bench/run_study.sh is the second's, on
# cnn_medium_fc): bench/study.py invocations, each shared by two worker processes (one per core) on one work
# directory, every finished run kept in the committed archive bench/results/study3_runs/ (its summary, α records
# and, on noise20, the flipped-label detection). Re-running skips every finished run, read back from the work
# directory or the archive after its config fingerprint and teacher digest are checked, so the study resumes in a
# later session or on another machine from a clean clone, and re-writes the tables and figures at the end (the
# cost runs alone are re-timed every time: about 5 min).
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
  # The outlier probe's pair (subset10/mlp) is also the MLP's: its figure goes into a folder of its own.
  figures=$OUT/figures/study3; [ "$name" = study3_outliers ] && figures=$figures/outliers && mkdir -p "$figures"
  $PY bench/study.py --workdir "$W" --archive "$ARCHIVE" "${TEACHER[@]}" --worker 1 "$@" > "$W/w1_$name.log" 2>&1 &
  $PY bench/study.py --workdir "$W" --archive "$ARCHIVE" "${TEACHER[@]}" --worker 0 --out "$OUT/$name.json" \
      --figures "$figures" "$@" > "$W/w0_$name.log" 2>&1
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
# The paper's outlier probe: 500 Gaussian-noise images with random labels appended (MLP, subset10).
run2 study3_outliers --students mlp --settings subset10 --seeds 2 --methods tgeo_outliers
# The CNN on subset10, main comparison first (CE, the α grid, the best α and one_step at 5 seeds), so that a study
# cut short by its budget still has the comparison the question asks for.
CNN=(--students cnn_small --lr_grid 0.1,0.2)
run2 study3_cnn_subset10 "${CNN[@]}" --settings subset10 --seeds 5 --grid_seeds 1 --methods $CORE
# full and noise20 on the CNN: 3 epochs, 5 seeds for CE, the best α, one_step and head_only (the α grid at seed 0).
for s in noise20 full; do
  run2 study3_cnn_$s "${CNN[@]}" --settings $s --epochs $s=3 --seeds 5 --grid_seeds 1 --methods $CORE,tgeo_head_only
done
# Then the rest of CNN subset10: the hypergradient variants (2 seeds; on a CNN an unrolled step costs ~17x a KD
# step on XLA:CPU, an implicit meta step ~60x: docs/benchmarks.md), head_only at 5, the other controls at 2.
LESS=kd_tgeo_mean_alpha=2,dist=2,anl_kd=2,kd_trainval=2,dkd=2,rw_kd=2,ada_kd=2,wls_kd=2
LESS=$LESS,tgeo_center=2,tgeo_unroll4=2,tgeo_implicit_eta0.01_m5=2
run2 study3_cnn_subset10 "${CNN[@]}" --settings subset10 --seeds 5 --grid_seeds 1 --method_seeds $LESS \
    --methods $CORE,tgeo_unroll4,tgeo_implicit_eta0.01_m5,tgeo_head_only,tgeo_center,$CONTROLS
# Cost, one run after another in ONE process (nothing else on the machine): full/mlp at its chosen rate and best α
# (read from study3_mlp.json), after a warm-up KD run (the process's first teacher run pays for the teacher-logit
# table when the cache lacks it: about 20 s here). Not archived: its runs time the machine, they are not the study's
# results.
read -r LR ALPHA < <($PY -c "import json; r = json.load(open('$OUT/study3_mlp.json'))['results']['full/mlp'];
print(r['learning_rate'], r['best_alpha']['alpha'])")
WARM=$([ "$ALPHA" = 0.1 ] && echo 0.5 || echo 0.1)
rm -rf "${W}_cost"  # timed afresh every time: a finished run read back would time nothing
mkdir -p "${W}_cost" && ln -sfn "$(cd "$W" && pwd)/teacher_logits" "${W}_cost/teacher_logits"
$PY bench/study.py --workdir "${W}_cost" "${TEACHER[@]}" --worker 0 --out "$OUT/study3_cost_full_mlp.json" \
    --students mlp --settings full --lr_grid "$LR" --seeds 1 --grid_seeds 1 \
    --methods ce,kd_a$WARM,kd_a$ALPHA,anl_kd,ada_kd,wls_kd,rw_kd,dist,dkd,tgeo,tgeo_head_only,tgeo_unroll4,tgeo_implicit \
    > "${W}_cost/cost.log" 2>&1
# α as a detector of the flipped labels (every learned-α run of noise20, from the archive).
$PY bench/alpha_label_noise.py --archive "$ARCHIVE" --out "$OUT/study3_alpha_label_noise.json"
$PY bench/study_tables.py "$OUT"/study3_{mlp,cnn_subset10,cnn_noise20,cnn_full,outliers}.json
$PY bench/study_tables.py --cost "$OUT/study3_cost_full_mlp.json" --cost_reference kd_a$ALPHA --cost_warmup kd_a$WARM
