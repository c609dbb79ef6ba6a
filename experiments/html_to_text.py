#!/usr/bin/env python3
"""HTML pages as plain-text documents, with only the standard library (for build_corpus.sh).

    python experiments/html_to_text.py SRC_DIR OUT_DIR [--exclude GLOB ...] [--drop-class NAME ...]

Every *.html / *.htm (optionally .gz) under SRC_DIR (symbolic links not followed) becomes
OUT_DIR/<same relative path>.txt, one document per page. Scripts, styles and the <head> are
dropped; so are navigation bars and sidebars when the page marks its content with role="main"
(Sphinx and most generated docs do), Sphinx's pilcrow anchors, and any element with a class
given by --drop-class (for pages without role="main", such as DocBook's navheader/navfooter).
Block elements become line breaks, <pre> keeps its layout, and other runs of whitespace become
single spaces. Pages left with no text are skipped. Files are visited in sorted order and nothing
depends on the clock, so the output is a pure function of the input.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

SKIP = {"script", "style", "head", "noscript", "template", "svg", "math"}  # text never kept
BLOCK = {
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div", "dl",
    "dt", "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "td", "th", "tr", "ul",
}  # a line break before and after
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Text(HTMLParser):
    """Collects the visible text of one page (only of its role="main" element if `main_only`)."""

    def __init__(self, main_only: bool, drop_classes: frozenset[str] = frozenset()) -> None:
        self.drop_classes = drop_classes  # elements with one of these classes are dropped
        self.out: list[str] = []
        self.open: list[tuple[str, bool]] = []  # open non-void elements: (tag, counts in skip)
        self.skip = 0  # depth inside SKIP elements and headerlink anchors
        self.pre = 0  # depth inside <pre>
        self.main = "before" if main_only else "in"  # before | in | after the role="main" element
        self.main_tag = ""  # its tag name, and how deeply that tag nests inside it
        self.main_depth = 0
        super().__init__(convert_charrefs=True)

    def keeping(self) -> bool:
        return self.skip == 0 and self.main == "in"

    def emit_break(self, text: str = "\n") -> None:
        if not self.keeping():
            return
        if self.out and not self.pre:
            self.out[-1] = self.out[-1].rstrip(" ")
        self.out.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in VOID:
            if tag in BLOCK:
                self.emit_break()
            return
        if self.main == "before" and a.get("role") == "main":
            self.main, self.main_tag = "in", tag
        if self.main == "in" and tag == self.main_tag:
            self.main_depth += 1
        classes = set((a.get("class") or "").split())
        hidden = (tag in SKIP or (tag == "a" and "headerlink" in classes)
                  or not classes.isdisjoint(self.drop_classes))
        self.open.append((tag, hidden))
        self.skip += hidden
        if tag in BLOCK:
            self.emit_break("\n- " if tag == "li" else "\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or all(t != tag for t, _ in self.open):
            return  # a stray end tag
        while True:  # also closes what was left open inside (<li>, <p> and the like)
            t, hidden = self.open.pop()
            self.pre -= t == "pre"
            if t in BLOCK and t != "li":  # items start on a line of their own anyway
                self.emit_break()
            self.skip -= hidden
            if t == tag:
                break
        if self.main == "in" and tag == self.main_tag:
            self.main_depth -= 1
            if self.main_depth == 0:
                self.main = "after"

    def handle_data(self, data: str) -> None:
        if not self.keeping():
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith(("\n", " ")):
                data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def text(self) -> str:
        text = re.sub(r"[ \t]+\n", "\n", "".join(self.out))  # trailing spaces
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n ")


def html_to_text(html: str, drop_classes: frozenset[str] = frozenset()) -> str:
    """The visible text of an HTML page (only its role="main" element if it has one), without
    the elements that have a class in `drop_classes`."""
    parser = _Text(main_only=bool(re.search(r"""role\s*=\s*["']?main\b""", html)),
                   drop_classes=drop_classes)
    parser.feed(html)
    parser.close()
    return parser.text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="directory searched recursively for HTML pages")
    ap.add_argument("out", type=Path, help="directory the .txt documents are written to")
    ap.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB",
        help="skip pages whose path relative to SRC matches GLOB (fnmatch; repeatable)",
    )
    ap.add_argument(
        "--drop-class", action="append", default=[], metavar="NAME",
        help="drop elements (and their text) whose class attribute includes NAME (repeatable)",
    )
    args = ap.parse_args()
    drop = frozenset(args.drop_class)
    pages = sorted(  # symbolic links are not followed: they may point outside SRC (or twice in)
        Path(d, f) for d, _, names in os.walk(args.src) for f in names
        if re.search(r"\.html?(\.gz)?$", f, re.I) and not Path(d, f).is_symlink()
    )
    n_in = n_out = n_chars = 0
    for p in pages:
        rel = p.relative_to(args.src).as_posix()
        if any(fnmatch.fnmatch(rel, g) for g in args.exclude):
            continue
        n_in += 1
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        text = html_to_text(raw.decode("utf-8", errors="replace"), drop)
        if not text:
            continue
        dest = args.out / (re.sub(r"\.html?(\.gz)?$", "", rel, flags=re.I) + ".txt")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text + "\n", encoding="utf-8")
        n_out += 1
        n_chars += len(text) + 1
    print(f"html_to_text: {n_in} page(s) under {args.src} -> {n_out} document(s), "
          f"{n_chars / 1e6:.1f} M characters in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
