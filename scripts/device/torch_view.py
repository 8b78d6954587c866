"""Link torch and the distributions it needs, as installed in this interpreter, into one directory (the device
check's install step puts it on the venv's path with a ``.pth``), leaving out the names the bundle pins.

    python scripts/device/torch_view.py VIEW REQUIREMENTS...

Only what torch declares, transitively (markers evaluated here), becomes visible: the machine's other packages
(numpy 2, scipy and the rest built against it) do not. Standard library and pip's vendored ``packaging`` only.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # (pip vendors it)
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]


def torch_closure(skip: set[str]) -> list[md.Distribution]:
    """torch and what it requires, transitively, as installed here, less ``skip`` (canonical names)."""
    seen: dict[str, md.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in skip:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # (an optional need not installed here)
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def main() -> int:
    view = Path(sys.argv[1])
    pinned = set()
    for path in sys.argv[2:]:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                pinned.add(canonicalize_name(re.split(r"[=<>!~ ;\[]", line.strip(), maxsplit=1)[0]))
    view.mkdir(parents=True)
    linked = []
    for dist in torch_closure(pinned):
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}):
            source, target = Path(dist.locate_file(top)), view / top
            if source.exists() and not target.exists():
                os.symlink(source, target)
                linked.append(top)
    print(f"torch view: {len(linked)} entries from the machine's site-packages in {view}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
