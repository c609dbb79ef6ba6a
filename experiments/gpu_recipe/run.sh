#!/usr/bin/env bash
# The paper at GPU scale, one command: Table 1 at s/m/l/xl with every structure (and BTT) and the
# LowRank scaling curves (paper.toml), then Table 2's wide & structured runs at m and l beside their
# dense and GQA baselines (the wide-*/gqa-*/paper-* presets carry the paper's token budgets).
#   bash experiments/gpu_recipe/run.sh                 (GPUS=8 OUT=runs/paper; resumable)
#   DRY=1 bash experiments/gpu_recipe/run.sh           the runs and their predicted GPU-hours only
# Predicted GPU-hours: the paper's FLOP accounting at MFU (default 0.4) of PEAK FLOP/s per GPU
# (default 989e12, an H100 SXM's bf16 dense peak); the paper reports 352 h for xl dense on its GPUs.
set -euo pipefail
GPUS=${GPUS:-8}
OUT=${OUT:-runs/paper}
PEAK=${PEAK:-989e12}
MFU=${MFU:-0.4}
HERE=$(dirname "$0")
structlm sweep "$HERE/paper.toml" --out_dir "$OUT" --dry-run
for p in paper-m gqa-m wide-m paper-l gqa-l wide-l; do  # Table 2
  structlm info --preset "$p" --json | python -c "
import json, sys
from structlm.config import PRESETS
cfg = PRESETS['$p']()
info = json.load(sys.stdin)
flops = 3 * info['flops_per_token'] * cfg.train.max_tokens
print(f\"table2/$p: {info['params_total']:,} params, {cfg.train.max_tokens:.3g} tokens, {flops:.3e} FLOPs, \"
      f\"{flops / ($PEAK * $MFU) / 3600:.1f} GPU-hours at {$MFU:.0%} MFU\")"
done
[[ -n "${DRY:-}" ]] && exit 0
torchrun --nproc_per_node "$GPUS" -m structlm sweep "$HERE/paper.toml" --out_dir "$OUT"
for p in gqa-m wide-m gqa-l wide-l; do  # paper-m and paper-l dense are the sweep's dense runs
  torchrun --nproc_per_node "$GPUS" -m structlm train --preset "$p" --train.out_dir "$OUT/table2-$p"
done
structlm report "$OUT"/paper-{s,m,l,xl}-* --md "$OUT/table1.md"
structlm report "$OUT"/paper-{m,l}-dense "$OUT"/table2-* --decode_batch 64 256 --md "$OUT/table2.md"
structlm scaling "$OUT"/paper-* --plot "$OUT/scaling.png" --json "$OUT/scaling.json"
structlm plan --from "$OUT"/paper-* --flops 1e21
