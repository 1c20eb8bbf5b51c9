#!/usr/bin/env bash
# The one-command GPU check (issue 23): prints one JSON line per figure, in under 8 minutes.
#
#     MNIST_DIR=path/to/mnist bash benchmarks/gpu.sh       # from the repository root
#
# MNIST_DIR: a folder with the four MNIST IDX files (train-images-idx3-ubyte.gz, ...); default
# ~/.cache/vaekit/mnist, where `vaekit data fetch mnist` puts them. A GPU machine that cannot reach
# the internet needs them carried along. PYTHON: the interpreter (default: python).
#
# What it runs, in order:
#  1. the CUDA end-to-end check: no test of tests/ is marked for CUDA (every test pins
#     --device cpu), so the real entry points run on the GPU instead: `vaekit train` (1 epoch of
#     the shipped MNIST sample, bf16) then `vaekit eval` of that run (K=50): pass/fail lines;
#  2. the bf16 and fp32 matmul peaks (benchmarks/peak.py --no-layers);
#  3. training throughput of the seed's model and of the best model's recipe (--model frontier:
#     configs/mnist-frontier.json, pretrained:mnist-best's, spatial), bf16, one full-MNIST epoch
#     each (benchmarks/train_throughput.py); the seed's line carries minutes_per_100_epochs
#     (100 x (epoch + test pass), estimated from the measured epoch) and the peak GPU memory;
#  4. evaluation throughput (decodes/s of the IWAE bound, fraction of the peak) of both models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo '{"benchmark": "gpu.sh", "error": "torch sees no CUDA GPU (torch.cuda.is_available() is False): run this on a GPU machine"}'
    exit 1
}
MNIST_DIR=${MNIST_DIR:-$HOME/.cache/vaekit/mnist}
[ -f "$MNIST_DIR/train-images-idx3-ubyte.gz" ] || [ -f "$MNIST_DIR/train-images-idx3-ubyte" ] || {
    echo "{\"benchmark\": \"gpu.sh\", \"error\": \"no MNIST IDX files in $MNIST_DIR: set MNIST_DIR to a folder holding them\"}"
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. the entry points on CUDA (each bounded, so one hang cannot eat the 8 minutes)
check() {   # check NAME COMMAND...: one JSON line, pass or the last line of the error
    local name=$1; shift
    if out=$(timeout 60 "$@" 2>&1); then
        echo "{\"benchmark\": \"cuda_check\", \"check\": \"$name\", \"result\": \"pass\"}"
    else
        echo "{\"benchmark\": \"cuda_check\", \"check\": \"$name\", \"result\": \"fail\", \"last_line\": $("$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1].strip().splitlines()[-1:]))' "$out")}"
    fi
}
check "vaekit train --device cuda --precision bf16" \
    "$PYTHON" -m vaekit train --data-dir tests/data/mnist-sample --epochs 1 --device cuda --precision bf16 --out "$tmp/run"
check "vaekit eval --device cuda --k 50" "$PYTHON" -m vaekit eval "$tmp/run" --k 50 --device cuda

cd benchmarks
bench() {   # bench SECONDS SCRIPT ARGS...: its JSON lines, or one line saying it failed (the rest still runs)
    local seconds=$1 script=$2; shift 2
    timeout "$seconds" "$PYTHON" "$script" "$@" | grep '^{' ||
        echo "{\"benchmark\": \"$script\", \"args\": \"$*\", \"error\": \"failed or ran past ${seconds} s\"}"
}
# 2. the peaks; 3. training (seed: 2 fresh one-epoch runs, frontier: 1); 4. evaluation. Worst case,
# every timeout reached: 2 x 60 + 45 + 120 + 90 + 2 x 45 = 465 s.
bench 45 peak.py --device cuda --no-layers
bench 120 train_throughput.py --device cuda --precision bf16 --repeats 2 --data-dir "$MNIST_DIR"
bench 90 train_throughput.py --device cuda --precision bf16 --repeats 1 --model frontier --data-dir "$MNIST_DIR"
for model in seed frontier; do
    bench 45 eval_throughput.py --device cuda --precision bf16 --model "$model" --k 1000 --images 40
done
