"""Build the device bundle (docs/gpu.md): wheels for CPython 3.12 + a trimmed tritonserver, <= 64 MiB.

    python scripts/prepare_device_bundle.py --out shared/device_bundle   # carry bundle.tar.xz from there

Run it on a machine with a package registry, from the project's own environment (its versions are the pins).
``--python 3.11`` builds the same bundle for this machine's Python: the CPU rehearsal of the device check installs
it into a fresh virtual environment (``scripts/device_check.sh --cpu``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from triton_backend.tools.bundle import BUDGET_BYTES, TARGET_PYTHON, build


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory: bundle.tar.xz and manifest.json only")
    parser.add_argument("--python", default=TARGET_PYTHON, help="target CPython version (default %(default)s)")
    args = parser.parse_args()
    manifest = build(Path(args.out), args.python)
    print(json.dumps({k: v for k, v in manifest.items() if k != "pins"}, indent=1))
    size = manifest["archive_bytes"]
    print(f"bundle.tar.xz: {size / 2**20:.1f} MiB of {BUDGET_BYTES / 2**20:.0f} MiB")
    if size > BUDGET_BYTES:
        print("error: over the budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
