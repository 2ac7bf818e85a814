"""Start-up time of `tta --help` and `tta list` as a ratio to `python -c "import torch"`, measured in one run.

    .venv/bin/python bench/bench_startup.py [--rounds 10]

Each command runs in a fresh interpreter (`python -c ...`), rounds interleaved so machine load hits all
of them alike; the table gives the median wall time and its ratio to `import torch`, and which heavy
modules each command imported (none expected for --help and list).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "cv2", "scipy", "onnxruntime")
REPORT = "import sys; print('heavy=' + ','.join(m for m in {heavy!r} if m in sys.modules))"
COMMANDS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "tta --help": "from tta.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "tta list": "from tta.cli import main\nmain(['list'])",
}


def run_once(code: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + "\n" + REPORT.format(heavy=HEAVY)], env=env,
                         capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    heavy = next((line[6:] for line in out.splitlines() if line.startswith("heavy=")), "")
    return elapsed, heavy or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    heavy: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, code in COMMANDS.items():
            t, h = run_once(code)
            times[name].append(t)
            heavy[name] = h
    torch_median = statistics.median(times["import torch"])
    print(f"{'command':<16} {'median s':>9} {'vs import torch':>16}  heavy modules imported")
    for name in COMMANDS:
        m = statistics.median(times[name])
        print(f"{name:<16} {m:9.3f} {m / torch_median:15.2f}x  {heavy[name]}")
    print(f"({args.rounds} rounds, interleaved; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
