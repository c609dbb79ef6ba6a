#!/usr/bin/env bash
# The Chinchilla-regime study (sweep.toml): build the Debian corpus, prepare it at vocab 2048, run
# the sweep (resumable: rerun to continue), copy every finished run's summary.json to
# docs/chinchilla_study/summaries/, then fit and plot with structlm scaling and the gap trend.
#   bash experiments/chinchilla_study/run.sh        (SUMMARIES=docs/chinchilla_study/summaries)
set -euo pipefail
HERE=$(dirname "$0")
SUMMARIES=${SUMMARIES:-docs/chinchilla_study/summaries}
bash experiments/build_corpus.sh data/corpus-debian-xl
structlm prepare --data.source data/corpus-debian-xl --data.vocab_size 2048 \
  --data.data_dir data/debian-xl-bpe2048
structlm sweep "$HERE/sweep.toml" || echo "sweep stopped; rerun to continue" >&2
mkdir -p "$SUMMARIES"
for s in runs/chinchilla/*/summary.json; do
  [[ -f "$s" ]] && cp "$s" "$SUMMARIES/$(basename "$(dirname "$s")").summary.json"
done
structlm scaling "$SUMMARIES" --x non_embedding --plot docs/chinchilla_study/scaling.png \
  --json docs/chinchilla_study/scaling.json
python "$HERE/gap.py" "$SUMMARIES" --md docs/chinchilla_study/gap.md --plot docs/chinchilla_study/gap.png
