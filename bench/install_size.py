"""Installed size of `tta-runtime` with an extra: the distribution plus the closure of what it requires.

    python bench/install_size.py dist/tta_runtime-*.whl --extra edge     # in an env where that extra is installed
    python bench/install_size.py dist/tta_runtime-*.whl --extra torch

The requirements come from the wheel's METADATA (Requires-Dist, markers evaluated for the chosen
extra), each requirement's own requirements from the environment's installed metadata; sizes are
the installed files of every distribution in the closure (RECORD entries, stat'ed), plus the wheel's
own files unpacked. Run it with the interpreter of the environment to measure.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def requirements(lines: list[str], extras: set[str]) -> list[Requirement]:
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            total += path.stat().st_size
    return total


def closure(reqs: list[Requirement], own: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in sizes or name == own:
            if name == own:  # self-referencing extras
                continue
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed in this environment")
        sizes[name] = dist_size(dist)
        todo += requirements(dist.requires or [], set(req.extras))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel")
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        own_size = sum(i.file_size for i in z.infolist())
    lines = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    extras = set(args.extra)
    own = _name(next(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Name:")))
    reqs = requirements(lines, extras)
    # an extra that names the distribution itself (test = ["tta-runtime[torch]"]) adds that extra's requirements
    for req in list(reqs):
        if _name(req.name) == own:
            reqs += requirements(lines, set(req.extras))
    sizes = closure(reqs, own)
    total = own_size + sum(sizes.values())
    print(f"tta-runtime[{','.join(sorted(extras)) or ''}]: {total / 2**20:.0f} MiB in {len(sizes) + 1} distributions "
          f"(tta-runtime itself {own_size / 2**20:.1f} MiB)")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:<28} {size / 2**20:8.1f} MiB")
    print("  torch in the closure:", "torch" in sizes)


if __name__ == "__main__":
    main()
