"""Table and plot of experiments/structure_study/run.sh: held-out perplexity of SmolLM2-135M with
its FFNs projected onto each structure (plain and activation-aware), after healing without and with
guides, against the speed of each structure.
    python experiments/structure_study/plot.py [OUT] [DOCS]"""

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

KINDS = ("lowrank", "blockdense", "blockshuffle")
STAGES = {"": "plain", "-aware": "aware", "-aware-heal": "healed", "-aware-heal-sgt": "guided"}


def load(out: Path) -> tuple[dict, dict, dict]:
    """(perplexity by run name, FFN weights kept by model, speed row by model)."""
    ppl = {}
    for p in out.glob("eval-*.json"):
        r = json.loads(p.read_text())
        ppl[r["run"]] = r["ppl"]
    kept = {}
    for kind in KINDS:
        for f in ("63", "32"):
            rep = json.loads((out / f"{kind}-{f}" / "conversion.json").read_text())
            rep = rep["layers"] if isinstance(rep, dict) else rep  # a list before 0.2.0
            kept[f"{kind}-{f}"] = (sum(x["params_after"] for x in rep)
                                   / sum(x["params_before"] for x in rep))
    speed_path = out / "speed.jsonl"
    speed = {}
    if speed_path.exists():
        for ln in speed_path.read_text().splitlines():
            r = json.loads(ln)
            speed[r["run"]] = r
    return ppl, kept, speed


def table(ppl: dict, kept: dict, speed: dict) -> list[str]:
    cell = lambda v, f="{:,.1f}": "–" if v is None else f.format(v)  # noqa: E731
    lines = ["| model | FFN weights kept | ppl plain | ppl aware | healed | healed, guided "
             "| FFN prefill × | FFN decode × (factors / merged) | model prefill × "
             "| model decode × (pre-merge) |", "|---" * 10 + "|",
             f"| SmolLM2-135M dense | 100% | {ppl['dense']:.1f} | | | | 1 | 1 | 1 | 1 |"]
    for name, k in kept.items():
        p = [ppl.get(name + s) for s in STAGES]
        sp = speed.get(name, {})
        dec = (f"{sp['ffn_decode_structured']:.2f} / {sp['ffn_decode_merged']:.2f}"
               if sp else "–")
        lines.append(f"| {name} | {k:.1%} | " + " | ".join(cell(v) for v in p)
                     + f" | {cell(sp.get('ffn_prefill'), '{:.2f}')} | {dec} "
                     f"| {cell(sp.get('model_prefill'), '{:.2f}')} "
                     f"| {cell(sp.get('model_decode_premerged'), '{:.2f}')} |")
    return lines


def plot(ppl: dict, kept: dict, speed: dict, png: Path) -> None:
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    for kind in KINDS:
        for suffix, stage in STAGES.items():
            pts = sorted((kept[f"{kind}-{f}"], ppl[f"{kind}-{f}{suffix}"]) for f in ("63", "32")
                         if f"{kind}-{f}{suffix}" in ppl)
            if pts:
                left.plot(*zip(*pts, strict=True), "o-", label=f"{kind} {stage}", ms=5,
                          alpha=0.85)
        pts = sorted((speed[f"{kind}-{f}"]["model_prefill"], ppl[f"{kind}-{f}-aware-heal"])
                     for f in ("63", "32") if f"{kind}-{f}" in speed
                     and f"{kind}-{f}-aware-heal" in ppl)
        if pts:
            right.plot(*zip(*pts, strict=True), "o-", label=f"{kind} (aware, healed)")
    for ax in (left, right):
        ax.axhline(ppl["dense"], color="k", lw=0.8, ls="--", label="dense")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_ylabel("held-out perplexity (log scale)")
    left.set_xlabel("share of the converted FFN layers' weights kept")
    left.set_title("SmolLM2-135M: projection, then healing", fontsize=10, loc="left")
    right.set_xlabel("whole-model prefill speed-up over dense (1 x 512 tokens, bf16, CPU)")
    right.set_title("perplexity against speed", fontsize=10, loc="left")
    left.legend(fontsize=6, ncol=2)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/structure-study")
    docs = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/structure_study")
    docs.mkdir(parents=True, exist_ok=True)
    ppl, kept, speed = load(out)
    lines = table(ppl, kept, speed)
    (docs / "table.md").write_text("\n".join(lines) + "\n")
    plot(ppl, kept, speed, docs / "ppl.png")
    print("\n".join(lines))
