#!/usr/bin/env bash
# bench/gpu_check.py, bench/device_loop.py and bench/torch_peer.py on the device machine, from the repository root
# (results in $OUT, else bench/results):
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
python3 bench/gpu_check.py --budget-s 240 --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
# The whole loop, host pipeline against device-resident pipeline (synthetic data: the device has neither Debian's
# Fashion-MNIST nor TFDS), and the KD step against the PyTorch loop on the same GPU: with gpu_check.py's 240 s
# budget above, the three stay within 8 minutes.
timeout 120 python3 bench/device_loop.py --data synthetic --rows probe,kd,tgeo,resnet8x4_kd --rounds 3 --span 96 \
  --resnet-span 32 \
  --out "$out/device_loop_gpu.json" 2>&1 | tee "$out/device_loop_gpu.log"
timeout 100 python3 bench/torch_peer.py --device cuda --rounds 4 --threads 4 --out "$out/torch_peer_gpu.json" 2>&1 \
  | tee "$out/torch_peer_gpu.log"
