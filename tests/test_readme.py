"""The README says what is true: its extras table is pyproject's, its quick start is two commands
(the ones .ci/run executes)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / ".ci"))
from quickstart import quickstart  # noqa: E402


def extras_table() -> dict[str, str]:
    """extra name -> its 'adds' cell, from the README's extras table."""
    rows = re.findall(r"^\| `([a-z]+)` \| ([^|]+) \|", README, re.M)
    return {name: adds for name, adds in rows}


def package_name(requirement: str) -> str:
    return re.split(r"[<>=;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_extras_table_is_pyprojects():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    table = extras_table()
    assert set(table) == set(extras)
    for name, reqs in extras.items():
        if name == "dev":
            continue
        for req in reqs:
            pkg = package_name(req)
            if pkg == "structlm":  # an extra that includes another: named by its extra
                assert f"`{req.split('[')[1].rstrip(']')}`" in table[name]
            else:
                assert pkg.replace("-", "") in table[name].replace("-", "").lower(), (name, pkg)


def test_the_quick_start_is_two_commands_that_install_torch_first():
    cmds = quickstart(README)
    assert len(cmds) == 2
    assert all(c.startswith("pip install torch==") for c in cmds)
    assert cmds[0].endswith("structlm train") and "pytest" in cmds[1]


def readme_command(starts: str) -> str:
    """The README's shell command that begins with `starts` (continuation lines joined)."""
    text = README.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(starts))
    return " ".join(line.split())


@pytest.mark.slow
def test_the_readmes_lm_eval_command_runs_on_an_export(tmp_path):
    """The lm-evaluation-harness command as the README writes it, on a tiny structured run's
    export in place of runs/small-hf: the local task loads and every item is scored."""
    pytest.importorskip("lm_eval")
    from helpers import bpe_tokenizer, random_run

    from structlm.runs.export import export_run

    lines = (ROOT / "docs/lm_eval/shakespeare_cloze.jsonl").read_text().splitlines()
    bpe_tokenizer(tmp_path / "tokenizer.json", lines * 20)
    run, _ = random_run(tmp_path, tmp_path / "tokenizer.json", norm="layernorm", act="gelu",
                        pos_emb="rope", dense_ffn_layers=(0,),
                        ffn=__import__("structlm").LinearSpec("lowrank", rank=8))
    out = export_run(run, tmp_path / "hf", format="hf")
    cmd = readme_command("HF_DATASETS_OFFLINE=1 lm_eval").replace("runs/small-hf", str(out))
    cmd += f" --output_path {tmp_path / 'results'}"
    r = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shakespeare_cloze" in r.stdout and "acc" in r.stdout, r.stdout[-2000:]
