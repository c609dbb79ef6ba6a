#!/usr/bin/env bash
# The CPU benchmark run behind BENCHMARKS.md (~25 min on 2 cores). Rows go to $OUT/*.jsonl, plots to $OUT/*.png.
# It stops, deleting nothing, where $OUT already holds an earlier run's rows.
# COMPILE=1 adds the torch.compile'd FFN and training-step runs ($OUT/*_compiled.jsonl, ~5 min more).
# On a GPU machine the same commands run on CUDA (add e.g. --widths 1024,2048,3072,4096,5120 --dtype bf16).
set -euo pipefail
OUT=${OUT:-docs/bench}
DTYPE=${DTYPE:-auto}
ROWS=(peak kernel ffn train prefill crossover decode maxbatch ffn_compiled train_compiled)
mkdir -p "$OUT"
# every command appends its rows: an earlier run's files would mix with this one's, and they are
# someone's results, so stop rather than delete them
for r in "${ROWS[@]}"; do
  if [[ -e "$OUT/$r.jsonl" ]]; then
    echo "experiments/bench_cpu.sh: $OUT/$r.jsonl is an earlier run's; this run would append to" \
      "it. Move that run's rows away, or pick another folder: OUT=docs/bench-new bash $0" >&2
    exit 2
  fi
done
D768=(--preset paper-s --model.n_layer 4 --model.vocab_size 8192 --model.ffn.kind lowrank --model.ffn.rank 192)
structlm bench peak --dtype "$DTYPE" --json "$OUT/peak.jsonl"
structlm bench kernel --dtype "$DTYPE" --tokens 4096 --json "$OUT/kernel.jsonl"
structlm bench kernel --dtype "$DTYPE" --tokens 4096 --backward --json "$OUT/kernel.jsonl"
structlm bench ffn --dtype "$DTYPE" --widths 768,1024,1536,2048 --tokens 1,16,256,2048 --json "$OUT/ffn.jsonl" \
  --plot "$OUT/ffn_fwd.png"
structlm bench ffn --dtype "$DTYPE" --widths 1024 --tokens 4096 --backward --json "$OUT/ffn.jsonl"
structlm bench train "${D768[@]}" --dtype "$DTYPE" --batch 8 --seq 256 --reps 3 --json "$OUT/train.jsonl"
# the paper's d=768 model at full depth (12 layers), ~1 min more
structlm bench train "${D768[@]}" --model.n_layer 12 --dtype "$DTYPE" --batch 8 --seq 256 --reps 3 \
  --json "$OUT/train.jsonl"
structlm bench prefill "${D768[@]}" --dtype "$DTYPE" --batch 4 --seq 256 --json "$OUT/prefill.jsonl"
structlm bench crossover "${D768[@]}" --dtype "$DTYPE" --json "$OUT/crossover.jsonl" --plot "$OUT/crossover.png"
structlm bench decode "${D768[@]}" --dtype "$DTYPE" --gen 32 --reps 5 --json "$OUT/decode.jsonl"
structlm bench decode --preset small --dtype "$DTYPE" --gen 32 --reps 5 --calibrate --json "$OUT/decode.jsonl"
structlm bench maxbatch "${D768[@]}" --dtype "$DTYPE" --gen 256 --max_batch 1024 --json "$OUT/maxbatch.jsonl"
if [[ "${COMPILE:-0}" == 1 ]]; then
  structlm bench ffn --dtype "$DTYPE" --widths 1024 --tokens 4096 --backward --compile \
    --json "$OUT/ffn_compiled.jsonl"
  structlm bench train "${D768[@]}" --dtype "$DTYPE" --batch 8 --seq 256 --reps 3 --compile \
    --json "$OUT/train_compiled.jsonl"
fi
