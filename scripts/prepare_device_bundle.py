"""Build the device bundle (docs/gpu.md): wheels for CPython 3.12 + a trimmed tritonserver, <= 64 MiB.

    python scripts/prepare_device_bundle.py --out shared/device_bundle   # shared/ travels with the checkout

Run it on a machine with a package registry, from the project's own environment (its versions are the pins). It
prints what a device run carries: the archive plus the checkout's files, which must stay within 64 MiB. The CPU
rehearsal (``scripts/device_check.sh --cpu``) installs the same 3.12 bundle into a stand-in of the device's Python.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    checkout = checkout_bytes()
    print(
        f"travels: bundle.tar.xz {size / 2**20:.1f} MiB + the checkout's files {checkout / 2**20:.1f} MiB = "
        f"{(size + checkout) / 2**20:.1f} MiB of {BUDGET_BYTES / 2**20:.0f} MiB"
    )
    if size + checkout > BUDGET_BYTES:
        print("error: over what a device run may carry", file=sys.stderr)
        return 1
    return 0


def checkout_bytes() -> int:
    """Bytes of the files git tracks here (they travel with the bundle); 0 outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True)
    files = [root / name for name in run.stdout.decode().split("\0") if name] if run.returncode == 0 else []
    return sum(f.stat().st_size for f in files if f.is_file())


if __name__ == "__main__":
    sys.exit(main())
