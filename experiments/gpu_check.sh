#!/usr/bin/env bash
# The checks that need a CUDA machine, in under 10 minutes, writing JSONL rows to OUT:
#   1. the gpu-marked tests (CUDA kernels, compile, pre-merge on the device)
#   2. structlm bench ffn at the paper's widths (1024-6144) and token counts (1024-30720), bf16, fwd+bwd
#   3. structlm bench kernel and ffn with the Triton kernels (STRUCTLM_TRITON=auto, where triton is
#      installed) against the bmm/mm path (STRUCTLM_TRITON=0), at width 4096
#   4. structlm bench memory (ddp and fsdp, each activation-checkpointing mode, dense and LowRank-32%)
#      of paper-s on every GPU of the machine (peak memory per GPU, tokens/s)
#   bash experiments/gpu_check.sh          (OUT=gpu_check)
set -euo pipefail
OUT=${OUT:-gpu_check}
if compgen -G "$OUT/*.jsonl" >/dev/null; then  # every bench appends: runs would mix, so keep them
  echo "gpu_check: $OUT already holds an earlier run's rows; nothing was run. Move them away, or" \
    "pick another folder: OUT=$OUT-2 bash $0" >&2
  exit 2
fi
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi; run this on a CUDA machine" >&2; exit 1; }
N=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$OUT/gpus.txt"
python -m pytest -q -m gpu tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"
structlm bench ffn --device cuda --dtype bf16 --backward --widths 1024,2048,4096,6144 \
  --tokens 1024,4096,16384,30720 --reps 5 --json "$OUT/ffn.jsonl"
for t in auto 0; do  # the Triton block kernels vs the per-block mm path
  STRUCTLM_TRITON=$t structlm bench kernel --device cuda --dtype bf16 --backward --reps 5 \
    --json "$OUT/kernel-triton-$t.jsonl"
  STRUCTLM_TRITON=$t structlm bench ffn --device cuda --dtype bf16 --backward --widths 4096 \
    --tokens 4096,16384 --reps 5 --json "$OUT/ffn-triton-$t.jsonl"
done
structlm bench memory --preset paper-s --model.ffn.kind lowrank --model.ffn.rank 192 --device cuda \
  --dtype bf16 --procs "$N" --batch 8 --seq 1024 --reps 5 --json "$OUT/memory.jsonl"
echo "gpu_check: rows in $OUT/{ffn,kernel-triton-*,ffn-triton-*,memory}.jsonl"
