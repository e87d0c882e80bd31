#!/usr/bin/env bash
# The GPU lines of docs/performance.md in one run of a few minutes (issue 14): the teacher's
# training step at batch 8, 512 px, K=16, 6 cluster iterations in bf16 and fp32 with profiles,
# a batch-size sweep, and the compiled step. Each line of the output file is one JSON object of
# `python -m seglib.bench`.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]        # default: runs/gpu_bench (or $OUT when set)
#   PYTHON=/path/to/python bash scripts/gpu_bench.sh
#
# Needs a CUDA build of PyTorch; runs from the repository root without installing seglib.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-runs/gpu_bench}}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_bench.jsonl"
: > "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

bench() {  # one configuration; a failure (e.g. out of memory) is recorded and the run goes on
  local label=$1
  shift
  echo "== $label: $*" >&2
  local line
  if line=$("$PYTHON" -m seglib.bench --device cuda --json "$@" 2> "$OUT_DIR/$label.stderr"); then
    echo "{\"label\": \"$label\", \"result\": $line}" >> "$RESULTS"
    echo "$line" >&2
  else
    echo "{\"label\": \"$label\", \"error\": \"exit $?; see $label.stderr\"}" >> "$RESULTS"
    tail -n 3 "$OUT_DIR/$label.stderr" >&2
  fi
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" >&2 \
  || { echo "no CUDA device visible to $PYTHON" >&2; exit 2; }

REF="--batch 8 --size 512 --k 16 --cluster-iters 6 --lane fast"
bench ref_bf16_profile $REF --amp 1 --profile
bench ref_fp32_profile $REF --amp 0 --profile --skip-infer
bench learned_bf16 --batch 8 --size 512 --k 16 --cluster-iters 6 --lane learned --amp 1 --skip-infer
for b in 16 32 64; do
  bench "sweep_b${b}_bf16" --batch "$b" --size 512 --k 16 --cluster-iters 6 --lane fast --amp 1 --skip-infer --repeats 5
done
bench ref_bf16_compile $REF --amp 1 --compile --skip-infer --warmup 3
bench ref_bf16_cudagraphs $REF --amp 1 --compile reduce-overhead --skip-infer --warmup 3
echo "results: $RESULTS" >&2
