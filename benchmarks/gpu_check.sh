#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU, from the repository root (under 8 minutes on one H200):
# the `cuda` tests, then the GPU benchmarks (training speed against the seed-style loop, the fast recipe, JPEG
# decoding on the GPU). cnnkit runs from the source tree with the machine's own PyTorch; nothing is installed.
#
#   benchmarks/gpu_check.sh CIFAR_TRAIN [OUT]
#
# CIFAR_TRAIN: the CIFAR-10 JPEG training images, a folder in ImageFolder layout or a .tgz of one (made with
# `tar -C ../shared/datasets/cifar10-jpeg -czf train.tgz train`). OUT: where gpu_*.md/json and the test log go
# (default benchmarks/results). PARTS (environment) limits the speed benchmark's parts; TESTS_S, SPEED_S and
# DECODE_S bound each phase's seconds; DECODE_ARGS go to benchmarks/gpu_decode.
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
# pytest from the machine's Python, or else from PYTEST_LIB (pure-Python wheels unpacked there, for a machine
# that cannot reach a package index).
if ! $py -c 'import pytest' 2>/dev/null && [[ -n ${PYTEST_LIB:-} ]]; then export PYTHONPATH="$PYTHONPATH:$PYTEST_LIB"; fi
status=0
t0=$(date +%s)
# Each phase has its own time limit (seconds, from the environment), so that one slow phase cannot leave the
# others without a result; what a phase finished is in $out either way.
workers=$($py -c 'import importlib.util as u; print("-n 4" if u.find_spec("xdist") else "")')
timeout "${TESTS_S:-150}" $py -m pytest -m cuda -v -p no:cacheprovider $workers -rs --durations=15 \
  tests/test_cuda.py tests/data/test_device_decode.py tests/models/test_norm_kernels.py 2>&1 | tee "$out/gpu_tests.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
echo "cuda tests: $(( $(date +%s) - t0 )) s"
timeout "${SPEED_S:-240}" $py -m benchmarks.gpu_speed --data "$data" --out "$out" --epochs 2 ${PARTS:+--parts "$PARTS"} || status=1
echo "speed: $(( $(date +%s) - t0 )) s"
if [[ -z ${PARTS:-} ]]; then
  timeout "${DECODE_S:-80}" $py -m benchmarks.gpu_decode --out "$out" ${DECODE_ARGS:---batches 80} || status=1
fi
echo "gpu check: $(( $(date +%s) - t0 )) s, status $status"
exit $status
