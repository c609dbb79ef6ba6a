#!/usr/bin/env bash
# Preparation throughput: the ten-package Debian corpus (experiments/build_corpus.sh) tokenized with
# 1 and 2 worker processes, interleaved, REPS times each, with a fixed tokenizer (the built-in
# corpus's BPE, so no BPE training is timed). One JSON row per run: total seconds, tokenizing
# seconds, tokens, tokens/s, tokens/s per worker, and the peak resident set of the largest process.
#   bash experiments/bench_prepare.sh [CORPUS]     (default data/corpus-debian-xl; REPS=2)
set -euo pipefail
CORPUS=${1:-data/corpus-debian-xl}
REPS=${REPS:-2}
TOK=${TOK:-data/shakespeare-bpe8192/tokenizer.json}
[[ -f $TOK ]] || structlm prepare  # the built-in corpus and its BPE
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for rep in $(seq "$REPS"); do
  for w in 1 2; do
    out="$TMP/w$w-r$rep"
    /usr/bin/time -f "TIME %e %M" structlm prepare --data.source "$CORPUS" --data.tokenizer "$TOK" \
      --data.data_dir "$out" --data.workers "$w" > "$TMP/log" 2> "$TMP/err" || { cat "$TMP/err"; exit 1; }
    python - "$out" "$w" "$TMP/log" "$TMP/err" <<'PY'
import json, re, sys
out, w, log, err = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), open(sys.argv[4]).read()
meta = json.load(open(f"{out}/meta.json"))
tok_s = float(re.search(r"tokenized \(([\d.]+) s\)", log).group(1))
wall, rss = re.search(r"TIME ([\d.]+) (\d+)", err).groups()
n = meta["train_tokens"] + meta["val_tokens"]
print(json.dumps({"workers": w, "tokens": n, "wall_s": float(wall), "tokenize_s": tok_s,
                  "tokens_per_s": n / tok_s, "tokens_per_s_per_worker": n / tok_s / w,
                  "peak_rss_mib": int(rss) / 1024}))
PY
    rm -rf "$out"
  done
done
