"""What `profiling suite` ran: each stage, how long it took against its share, and what failed."""

from __future__ import annotations

from pathlib import Path

from .common import Section

KIND = "suite"


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    lines = [f"## What ran ({source.name})", "",
             f"{result['device']}, data {result['data']}: a budget of {result['budget_s'] / 60:.1f} min"
             + (f", used {result['seconds']:.0f} s before this report" if result.get("seconds") is not None else "")
             + (f"; work scaled to {result['scale']:.2f} of the nominal" if result["scale"] < 1 else "") + ".", "",
             "| stage | status | seconds | budget s |", "| --- | --- | ---: | ---: |"]
    for s in result["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} |")
    lines.append("")
    if result.get("doctor_verdict"):
        lines += [f"`{result['doctor_verdict']}`", ""]
    tests = result.get("gpu_tests")
    if tests:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines += [f"GPU tests: {passed} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped.", ""]
    elif result["device"] == "cpu":
        lines += ["GPU tests: not run (no GPU).", ""]
    lines += ["Each stage's output: `../logs/<stage>.log` (from this report's folder).", ""]
    return Section(lines)
