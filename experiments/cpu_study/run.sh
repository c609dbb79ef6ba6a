#!/usr/bin/env bash
# The CPU-scale reproduction of the paper's findings (issue 6), on the built-in corpus with a
# 2048-token BPE vocabulary. About 1.5 h on a 2-core CPU; every step skips finished runs, so the
# script can be re-run after an interruption and continues where it stopped.
#   1. scaling: 4 sizes x dense / LowRank-63% / LowRank-32% (+ BlockDense, BlockShuffle at 32%
#      at two sizes), every structure at its size's dense tokens          (scaling.toml)
#   2. self-guided training: LowRank-32% with and without SGT at the FLOPs of the dense 4x224 run
#   3. wide & structured: GQA dense and GQA + LowRank wide FFN at the same FLOPs
#   4. seed noise: the 4x224 dense / LowRank-63% / LowRank-32% runs with two more seeds
#   5. fits, tables and plots into docs/cpu_study/
# QUICK=1 runs a seconds-long smoke version of every step (tiny models, runs/cpu-study-quick).
set -euo pipefail
cd "$(dirname "$0")/../.."
SET=(data.vocab_size=2048 model.vocab_size=2048 train.batch_size=16 train.micro_batch_size=16)
if [[ "${QUICK:-0}" == 1 ]]; then  # smoke test (CI): 3 tiny sizes, a few steps each
  OUT=${OUT:-runs/cpu-study-quick} DOCS=${DOCS:-$OUT/docs} BOOT=${BOOT:-50}
  CORPUS=${CORPUS:-shakespeare}  # a small text directory makes it faster
  SET+=(data.source="$CORPUS" data.data_dir="$OUT/data" data.vocab_size=300
        model.vocab_size=300 model.block_size=32 train.eval_tokens=1024)
  TPP=0.5
  scaling=(--sizes 2x32h2 3x32h2 4x32h2 --structures dense lowrank:0.63 lowrank:0.32
           --tokens_per_param "$TPP" --param_group non_embedding --set "${SET[@]}")
  L=3 D=32 SIZE=3x32h2 HEADS=2 HEAD=16 GQA_DFF=144 WIDE_DFF=144 RANK=16
else
  OUT=${OUT:-runs/cpu-study} DOCS=${DOCS:-docs/cpu_study} BOOT=${BOOT:-2000}
  SET+=(train.eval_tokens=32768)
  scaling=(experiments/cpu_study/scaling.toml)
  TPP=0.25 L=4 D=224 SIZE=4x224h4 HEADS=4 HEAD=56 GQA_DFF=1064 WIDE_DFF=1064 RANK=112
fi
mkdir -p "$DOCS"

echo "== 1. scaling sweep"
structlm sweep "${scaling[@]}" --out_dir "$OUT/scaling"

FLOPS=$(python -c "import json; print(json.load(open('$OUT/scaling/$SIZE-dense/summary.json'))['train_flops'])")
echo "== 2. self-guided training at the FLOPs of $SIZE-dense ($FLOPS)"
structlm sweep --out_dir "$OUT/sgt" --flops "$FLOPS" --sizes "$SIZE" --structures lowrank:0.32 \
  --sgt false true --set "${SET[@]}"

echo "== 3. wide & structured at the same FLOPs"
train=(structlm train --preset small --model.n_layer "$L" --model.d_model "$D" --train.max_steps None
       --train.max_flops "$FLOPS" --train.eval_interval 0)
for kv in "${SET[@]}"; do train+=("--${kv%%=*}" "${kv#*=}"); done
# GQA: one KV head of HEADS; d_ff enlarged to keep the dense parameter count (Table 2's baseline)
"${train[@]}" --model.n_head "$HEADS" --model.n_kv_head 1 --model.d_ff "$GQA_DFF" \
  --model.ffn.kind dense --train.out_dir "$OUT/wide/gqa-dense"
# ours: half-width attention (HEADS/2 heads, one KV head) + LowRank FFN (R = d/2) of the same d_ff
"${train[@]}" --model.n_head $((HEADS / 2)) --model.attn_dim $((HEADS / 2 * HEAD)) \
  --model.n_kv_head 1 --model.d_ff "$WIDE_DFF" --model.ffn.rank "$RANK" \
  --train.out_dir "$OUT/wide/gqa-lowrank-wide"

echo "== 4. seed noise: the $SIZE triplet again with seeds 2 and 3"
for seed in 2 3; do
  structlm sweep --out_dir "$OUT/seed$seed" --sizes "$SIZE" --structures dense lowrank:0.63 lowrank:0.32 \
    --tokens_per_param "$TPP" --param_group non_embedding --set "${SET[@]}" train.seed=$seed
done

echo "== 5. fits, tables, plots"
structlm scaling "$OUT/scaling" --bootstrap "$BOOT" --json "$DOCS/scaling_flops.json" \
  --plot "$DOCS/scaling_flops.png"
structlm scaling "$OUT/scaling" --x non_embedding --bootstrap "$BOOT" \
  --json "$DOCS/scaling_params.json" --plot "$DOCS/scaling_params.png"
structlm report "$OUT/scaling" --md "$DOCS/scaling_table.md" --csv "$DOCS/scaling_table.csv"
structlm report "$OUT/seed2" "$OUT/seed3" --md "$DOCS/seeds_table.md" --csv "$DOCS/seeds_table.csv"
structlm report "$OUT/scaling/$SIZE-dense" "$OUT/sgt" --md "$DOCS/sgt_table.md" \
  --csv "$DOCS/sgt_table.csv"
structlm report "$OUT/scaling/$SIZE-dense" "$OUT/wide" --decode_batch ${DECODE_BATCH:-64 256 1024} \
  --md "$DOCS/wide_table.md" --csv "$DOCS/wide_table.csv"
