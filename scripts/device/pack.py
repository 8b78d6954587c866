"""Pack the device check's results (``RESULTS``) into ``OUT``: at most 8 files, none in a folder (what a lent
machine sends back). Run after every step, so a check cut short still returns what it measured.

    python3 scripts/device/pack.py RESULTS OUT

``OUT`` gets ``summary.json`` (each step's rc and seconds, and the headline numbers), ``results.tar.gz``
(everything under ``RESULTS``: logs, server logs, per-cell JSON, the JUnit XML) and the headline files as they are.
Standard library only: it runs with the machine's ``python3`` before anything is installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

#: Copied to OUT as they are (when present), beside the archive and the summary: 7 files at most.
HEADLINES = ("preflight.json", "install.json", "server.json", "tests.xml", "benchmark.md")
MAX_FILES = 8


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(results: Path) -> dict:
    steps = []
    if (results / "steps.jsonl").is_file():
        steps = [json.loads(line) for line in (results / "steps.jsonl").read_text().splitlines() if line.strip()]
    out: dict = {"steps": steps}
    for name in ("preflight.json", "install.json", "server.json", "bench/benchmark.json", "load/benchmark.json"):
        data = read_json(results / name)
        if data is not None:
            out[name.replace("/benchmark", "").removesuffix(".json")] = data
    cells = sorted((results / "bench" / "cells").glob("*.json")) if (results / "bench" / "cells").is_dir() else []
    if cells and "bench" not in out:  # (a bench cut short: the cells it finished)
        out["bench_cells"] = {p.stem: read_json(p) for p in cells}
    return out


def pack(results: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # (this script owns OUT: what an earlier pack wrote)
        if old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old)
    (out / "summary.json").write_text(json.dumps(summary(results), indent=1, default=str))
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(results, arcname="results")
    for name in HEADLINES:
        found = results / name if (results / name).is_file() else results / "bench" / name
        if found.is_file():
            shutil.copy2(found, out / name)
    written = sorted(p.name for p in out.iterdir())
    assert len(written) <= MAX_FILES, written
    return written


if __name__ == "__main__":
    print("packed:", ", ".join(pack(Path(sys.argv[1]), Path(sys.argv[2]))))
