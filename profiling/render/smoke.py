"""`profiling smoke`'s section: each check, ok or the first line of what failed."""

from __future__ import annotations

from pathlib import Path

from .common import Section, environment_line, incomplete_note

KIND = "smoke"


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    checks = result.get("checks") or []
    failed = [c for c in checks if not c["ok"]]
    lines = [f"## Smoke check ({source.name})", "", *incomplete_note(result),
             f"{len(checks) - len(failed)} of {len(checks)} checks ok on {result['config']['device']}.", "",
             "| check | result | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {c['name']} | {'ok' if c['ok'] else 'FAILED'} | {c['seconds']:.1f} | "
              f"{str(c['detail']).replace('|', '/')} |" for c in checks]
    lines += ["", f"Measured with: {environment_line(result['environment'])}", ""]
    return Section(lines)
