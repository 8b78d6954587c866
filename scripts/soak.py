"""Soak one server with thousands of mixed requests and report what grew (docs/operations.md).

    python scripts/soak.py --requests 2000 [--concurrency 4] [--json soak.json]
    python scripts/soak.py --requests 300 --chaos 20      # and kill a random stage every 20 s

Starts the bundled tritonserver on the default model (generated if missing), runs
:func:`triton_backend.tools.soak.run_soak`, prints the report and exits 1 if a target is missed: an unexpected
error, an image unequal to its solo result, total RSS growth over 5 %, more /dev/shm entries or descriptors. With
``--chaos``: under 95 % of the requests in flight at a kill got their image, or one ended 30 s or more after it
(memory and descriptors are not compared: killed stages come back as new processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from triton_backend.paths import default_model_dir
from triton_backend.serving.server import TritonServer
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.soak import run_soak


def show_progress(done: int, total: int) -> None:
    print(f"  {done}/{total} requests", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="default: the generated tiny default model")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--chaos", type=float, default=0.0, metavar="SECONDS", help="kill a random stage this often")
    args = parser.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else write_default_model(default_model_dir())
    log = Path(tempfile.mkdtemp(prefix="swiftdiffusion-soak-")) / "server.log"
    print(f"starting the server (log: {log}) ...", flush=True)
    with TritonServer(model_dir=model_dir, log_file=log) as server:
        report = run_soak(
            server, args.requests, args.concurrency, args.seed, progress=show_progress, chaos_every_s=args.chaos
        )
        reloads = len(server.watchdog.reloads) if server.watchdog else 0
    print("\n".join(report.lines()))
    if args.chaos:
        print("\n".join(report.chaos_lines()))
    print(f"stage reloads by the watchdog: {reloads}")
    if args.json:
        summary = {**dataclasses.asdict(report), "outcomes": dict(report.outcomes), "rss_growth": report.rss_growth}
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    worst = max((delay for delay, _ in report.in_flight_at_kills()), default=0.0)
    chaos_ok = report.recovered_fraction >= 0.95 and worst < 30
    ok = not report.unexpected and not report.mismatched
    ok = (
        (ok and chaos_ok)
        if args.chaos
        else (
            ok
            and report.rss_growth <= 0.05
            and report.end.shm_entries <= report.start.shm_entries  # type: ignore[union-attr]
            and sum(report.end.fds.values()) <= sum(report.start.fds.values())  # type: ignore[union-attr]
        )
    )
    print("PASS" if ok else "FAIL: a target was missed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
