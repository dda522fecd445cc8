"""What every benchmark leaves behind: `<stem>.json` (numbers and how they were made) and
`<stem>.md` (the table the docs quote), and the command line that reproduces them."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m <module> <args>` as it was run (argv None: this process's own arguments)."""
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_report(out: Path, stem: str, payload, md: str) -> None:
    """Write `<out>/<stem>.json` and `<out>/<stem>.md` (the folder is created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{stem}.md").write_text(md + "\n")
