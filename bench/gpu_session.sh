#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 18): build the CUDA library,
# run every GPU test, compare the logits with PyTorch's on the GPU
# (bench/gpu_check.py), chat one turn, then the GPU speed table, writing everything under
# $OUT (default ./gpu-results). The machine has nvcc, CMake, PyTorch and numpy
# but no package index and no cffi: carry a folder of wheels (cffi, gguf,
# pytest and their dependencies) made here with
#
#   pip download --only-binary=:all: --python-version 3.X -d gpu-wheels \
#       cffi gguf pytest jinja2 tokenizers tqdm llguidance
#
# (3.X: the GPU machine's Python) and the model(s) in the cache folder:
#
#   bash bench/gpu_session.sh gpu-wheels models/   # models/ holds the GGUF files
#
# Budget: the build takes ~1 minute, the tests seconds, the speed table a few
# minutes per model; every step writes its log before the next one starts and
# has a timeout, so a hang costs its step, not the session's GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:?folder of carried wheels}"
models="${2:?folder holding the GGUF files}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
export KVSINK_CACHE_DIR="$models" PYTHONPATH="$PWD/.deps:$PWD" PYTHONDONTWRITEBYTECODE=1

# --no-deps: the machine's own numpy (the one its torch was built with) must stay first
python3 -m pip install --quiet --no-index --find-links "$wheels" --target .deps --no-deps \
    cffi pycparser gguf pyyaml pytest pluggy iniconfig packaging > "$out/pip.log" 2>&1 ||
    { echo "pip failed: $out/pip.log"; exit 1; }

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DKVSINK_CUDA=ON > "$out/build.log" 2>&1 &&
    cmake --build build-cuda -j 16 >> "$out/build.log" 2>&1 || { echo "build failed: $out/build.log"; exit 1; }
export KVSINK_LIBRARY="$PWD/build-cuda/libkvsink.so"

python3 -c "import kvsink_cpp; print(kvsink_cpp.cuda_status())" | tee "$out/cuda_status.txt"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -m cuda tests > "$out/pytest-cuda.log" 2>&1
python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_absent.py tests/test_device.py \
    > "$out/pytest-device.log" 2>&1
tail -n 3 "$out"/pytest-*.log

smollm2="$(ls "$models"/SmolLM2-135M-Instruct*.gguf | head -n 1)"
# our logits against an independent forward (PyTorch float32) on the GPU, and a chat turn
for model in "$smollm2" $(ls "$models"/gemma-3-270m*.gguf 2>/dev/null | head -n 1); do
    timeout 120 python3 bench/gpu_check.py -m "$model" --json > "$out/gpu-check-$(basename "$model" .gguf).json" 2>&1
done
printf 'What is the capital of France?\n' |
    timeout 60 python3 -m kvsink_cpp chat "$smollm2" --device cuda -n 48 --temp 0 > "$out/chat-cuda.txt" 2>&1
for depth in 4096 16384; do
    timeout 240 python3 bench/speed.py --device cuda -m "$smollm2" --reps 3 --depth "$depth" -c $((depth + 1024)) --json \
        > "$out/speed-cuda-smollm2-depth$depth.json" 2> "$out/speed-cuda-smollm2-depth$depth.log"
done
timeout 120 python3 bench/compare_logits.py -m "$smollm2" -n 256 --json > "$out/compare-logits-cpu.json" 2>&1
echo "results in $out"
