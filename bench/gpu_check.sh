#!/usr/bin/env bash
# bench/gpu_check.py on the device machine, from the repository root (results in $OUT, else bench/results):
#
#   bash bench/gpu_check.sh [gpu_check.py flags]
#
# The device image has JAX (CUDA) but, as its package list reads, not grain (nor its array_record and portpicker)
# or ml_collections. Carry them as wheels in .whl/ (the device README's recipe, e.g. grain==0.2.18
# array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 for CPython 3.12 manylinux); when .whl/ holds any,
# they are unpacked offline into /tmp/site (outside the image) and put on PYTHONPATH. Nothing is downloaded.
set -u
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-bench/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1  # the output arrives as it is printed, also when the command is cut off
set -o pipefail
python3 bench/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
