#!/usr/bin/env bash
# muP's lr transfer (sweep.toml): build and prepare the Debian corpus (shared with the
# Chinchilla-regime study), run the sweep (resumable), copy the finished runs' summary.json files
# to docs/lr_transfer/summaries/, then tabulate and plot the loss against the lr per width.
#   bash experiments/lr_transfer/run.sh
set -euo pipefail
HERE=$(dirname "$0")
SUMMARIES=${SUMMARIES:-docs/lr_transfer/summaries}
bash experiments/build_corpus.sh data/corpus-debian-xl
structlm prepare --data.source data/corpus-debian-xl --data.vocab_size 2048 \
  --data.data_dir data/debian-xl-bpe2048
structlm sweep "$HERE/sweep.toml" || echo "sweep stopped; rerun to continue" >&2
mkdir -p "$SUMMARIES"
for s in runs/lr_transfer/*/summary.json; do
  [[ -f "$s" ]] && cp "$s" "$SUMMARIES/$(basename "$(dirname "$s")").summary.json"
done
python "$HERE/transfer.py" "$SUMMARIES" --md docs/lr_transfer/transfer.md \
  --plot docs/lr_transfer/transfer.png
