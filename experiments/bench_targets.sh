#!/usr/bin/env bash
# The bf16 speed targets of BENCHMARKS.md, rerun on this machine in one go (~3 min on a 2-core
# AMD EPYC; ~5 with NANOGPT): the measured peak, the FFN (fwd+bwd, width 1024, 4096 tokens; eager
# and compiled, interleaved in one loop), the structured ops against a dense matmul of equal FLOPs,
# and, where NANOGPT names nanoGPT's model.py, the training step against it. Rows go to a new
# folder named after this CPU and the date ($OUT to choose another), with the CPU's name and flags.
#   bash experiments/bench_targets.sh                       # OUT=docs/bench-targets/<cpu>-<date>
#   NANOGPT=path/to/nanoGPT/model.py bash experiments/bench_targets.sh
# It stops, deleting nothing, where $OUT already exists.
set -euo pipefail
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
OUT=${OUT:-docs/bench-targets/${CPU:-cpu}-$(date +%Y-%m-%d)}
if [[ -e $OUT ]]; then
  echo "experiments/bench_targets.sh: $OUT exists (an earlier run's rows?); nothing was run." \
    "Pick another folder: OUT=$OUT-2 bash $0" >&2
  exit 2
fi
mkdir -p "$OUT"
{ lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Flags)'; python -c 'import torch; print("torch", torch.__version__)'; } \
  > "$OUT/machine.txt"
say() { echo "[bench_targets $(date +%H:%M:%S)] $*"; }
say "rows in $OUT"
structlm bench peak --dtype bf16 --json "$OUT/peak.jsonl"
structlm bench ffn --backward --widths 1024 --tokens 4096 --reps 7 --dtype bf16 --compile \
  --json "$OUT/ffn.jsonl"
structlm bench kernel --backward --dtype bf16 --json "$OUT/kernel.jsonl"
if [[ -n ${NANOGPT:-} ]]; then
  structlm bench train --against "$NANOGPT" --model.n_layer 6 --model.d_model 768 --model.n_head 12 \
    --model.d_ff 3072 --model.vocab_size 8192 --model.ffn.kind lowrank --model.ffn.rank 192 \
    --batch 8 --seq 256 --reps 15 --dtype bf16 --json "$OUT/nanogpt.jsonl"
fi
say "done: compare with the targets in BENCHMARKS.md (ffn speedup / eager_speedup, kernel efficiency)"
