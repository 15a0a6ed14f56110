#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU, from the repository root (under 8 minutes on one H200):
# the `cuda` tests, then the GPU benchmarks (training speed against the seed-style loop, the fast recipe, JPEG
# decoding on the GPU). cnnkit runs from the source tree with the machine's own PyTorch; nothing is installed.
#
#   benchmarks/gpu_check.sh CIFAR_TRAIN [OUT]
#
# CIFAR_TRAIN: the CIFAR-10 JPEG training images, a folder in ImageFolder layout or a .tgz of one (made with
# `tar -C ../shared/datasets/cifar10-jpeg -czf train.tgz train`). OUT: where gpu_*.md/json and the test log go
# (default benchmarks/results). PARTS (environment) limits the speed benchmark's parts.
set -uo pipefail
data=${1:?usage: benchmarks/gpu_check.sh CIFAR_TRAIN [OUT]}
out=${2:-benchmarks/results}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
if [[ $data == *.tgz || $data == *.tar.gz ]]; then
  dest=$(mktemp -d /tmp/cnnkit-gpu-data.XXXX)
  tar -xzf "$data" -C "$dest" && data=$(find "$dest" -mindepth 1 -maxdepth 1 -type d | head -1)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)'
status=0
t0=$(date +%s)
workers=$($py -c 'import importlib.util as u; print("-n 4" if u.find_spec("xdist") else "")')
$py -m pytest -m cuda -q -p no:cacheprovider $workers -rs tests/test_cuda.py tests/data/test_device_decode.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
echo "cuda tests: $(( $(date +%s) - t0 )) s"
$py -m benchmarks.gpu_speed --data "$data" --out "$out" ${PARTS:+--parts "$PARTS"} || status=1
if [[ -f benchmarks/gpu_decode.py && -z ${PARTS:-} ]]; then
  $py -m benchmarks.gpu_decode --out "$out" || status=1
fi
echo "gpu check: $(( $(date +%s) - t0 )) s, status $status"
exit $status
