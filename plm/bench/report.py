"""A benchmark's report files: the JSON, and the markdown that starts with the command."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown lines of a table: the header, its rule, a line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def write(out: str | Path | None, stem: str, report: dict, lines: Sequence[str]) -> None:
    """Write OUT/STEM.json (`report`) and OUT/STEM.md (`lines`); nothing when `out` is None
    (benchmarks that rewrite their files after each case, so a stopped run keeps what it did)."""
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def save(out: str | Path, stem: str, report: dict, lines: Sequence[str]) -> str:
    """Write OUT/STEM.json (`report`) and OUT/STEM.md (its command, then `lines`), print both;
    returns the markdown."""
    md = "\n".join([f"Command: `{report['command']}`  ", *lines])
    write(out, stem, report, [md])
    print(md)
    print(json.dumps(report))
    return md
