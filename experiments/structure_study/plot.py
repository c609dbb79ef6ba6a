"""Table and plot of experiments/structure_study/run.sh: held-out perplexity of SmolLM2-135M against
the share of FFN weights kept, per structure and projection (no healing)."""

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/structure-study")
docs = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/structure_study")
docs.mkdir(parents=True, exist_ok=True)
rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
table = ["| model | FFN weights kept | max layer rel. error | val loss | val ppl |",
         "|---|---|---|---|---|"]
points: dict[str, list] = {}
for r in rows:
    conv = out / r["run"] / "conversion.json"
    rep = json.loads(conv.read_text()) if conv.exists() else []
    before = sum(x["params_before"] for x in rep)
    kept = sum(x["params_after"] for x in rep) / before if rep else 1.0
    err = max((x["rel_error"] for x in rep), default=0.0)
    table.append(f"| {r['run']} | {kept:.1%} | {err:.3f} | {r['loss']:.3f} | {r['ppl']:,.1f} |")
    family = r["run"].rsplit("-", 1)[0] if r["run"] != "dense" else "dense"
    family += " (activation-aware)" if r["run"].endswith("aware") else ""
    family = family.replace("-63", "").replace("-32", "")
    points.setdefault(family, []).append((kept, r["ppl"]))
(docs / "table.md").write_text("\n".join(table) + "\n")
fig = Figure(figsize=(7, 4.5))
ax = fig.subplots()
for fam, pts in points.items():
    pts.sort()
    ax.plot(*zip(*pts, strict=True), "o-" if len(pts) > 1 else "*", label=fam, ms=7)
ax.set_yscale("log")
ax.set_xlabel("share of the converted FFN layers' weights kept")
ax.set_ylabel("held-out perplexity (log scale)")
ax.set_title("SmolLM2-135M, FFNs projected onto structures, no healing", fontsize=10, loc="left")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(docs / "ppl.png", dpi=110)
print("\n".join(table))
