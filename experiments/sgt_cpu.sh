#!/usr/bin/env bash
# Self-guided training at equal training FLOPs on the built-in corpus (CPU, ~25 min on 2 cores):
#   dense FFN for STEPS steps | LowRank-32% for the same FLOPs (more tokens) | LowRank-32% + SGT (fixedflop,
#   reduce_flop, ratio solved to match the dense FLOPs). Same model otherwise: the `small` preset.
set -euo pipefail
OUT=${OUT:-runs/sgt}
STEPS=${STEPS:-300}
common=(--preset small --train.eval_interval 100)
structlm train "${common[@]}" --train.max_steps "$STEPS" --model.ffn.kind dense --train.out_dir "$OUT/dense"
FLOPS=$(python -c "import json; print(json.load(open('$OUT/dense/summary.json'))['train_flops'])")
structlm train "${common[@]}" --train.max_steps None --train.max_flops "$FLOPS" --train.out_dir "$OUT/lowrank32"
structlm train "${common[@]}" --train.max_steps "$STEPS" --train.sgt.mode fixedflop \
  --train.sgt.match_flops dense --train.sgt.reduce_flop True --train.out_dir "$OUT/lowrank32-sgt"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':<16}{'FFN params':>12}{'steps':>7}{'tokens':>10}{'train FLOPs':>13}{'val loss':>10}{'val ppl':>9}")
for name in ("dense", "lowrank32", "lowrank32-sgt"):
    s = json.loads((Path(sys.argv[1]) / name / "summary.json").read_text())
    print(f"{name:<16}{s['param_groups']['ffn']:>12,}{s['steps']:>7}{s['tokens']:>10,}{s['train_flops']:>13.3e}"
          f"{s['final_val_loss']:>10.4f}{s['final_val_ppl']:>9.2f}")
PY
