"""Print one of the README's two quick-start commands (1 or 2), exactly as written, so that CI
runs what a newcomer copies. `--budget ARGS` appends ARGS to the first command's `structlm train`
(a short run: the install lines stay as written)."""

import re
import sys
from pathlib import Path


def quickstart(readme: str) -> list[str]:
    """The command lines of the first ```bash block under '## Quick start'."""
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


if __name__ == "__main__":
    which = int(sys.argv[1])
    cmds = quickstart((Path(__file__).parent.parent / "README.md").read_text())
    assert len(cmds) == 2, f"the README's quick start should hold two commands, not {cmds}"
    cmd = cmds[which - 1]
    if len(sys.argv) > 3 and sys.argv[2] == "--budget":
        assert cmd.endswith("structlm train"), cmd
        cmd += " " + sys.argv[3]
    print(cmd)
