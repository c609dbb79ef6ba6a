"""The README says what is true: its extras table is pyproject's, its quick start is two commands
(the ones .ci/run executes)."""

import re
import sys
import tomllib
from pathlib import Path

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
