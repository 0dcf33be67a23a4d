"""``infer`` streams: its peak memory does not grow with the input. Decodes N and 10 x N lines with the same workdir
and prints each run's peak resident memory (the child's ru_maxrss) and the ratio.

    python experiments/reliability/infer_memory.py [--lines 200000] [--workdir DIR]

Without ``--workdir`` it first trains the demo (configs/demo.py:steps=60, about a minute). Each output line is
checked to be there (one per input). About 3 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "twenty",
    "thirty",
    "forty",
    "hundred",
    "thousand",
]


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def write_inputs(path: Path, lines: int) -> None:
    """``lines`` number phrases (as the demo task's inputs), a few of them empty."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write("" if i % 997 == 0 else " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 7)[: 1 + i % 3]))
            f.write("\n")


def peak_rss_of_infer(workdir: str, inputs: Path, outputs: Path) -> int:
    """Bytes of the infer process's peak resident memory."""
    command = [sys.executable, "-m", "t5x_lite.infer", "--workdir", workdir, "--input", str(inputs)]
    command += ["--output", str(outputs), "--batch_size", "256"]
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"infer failed: {stderr[-2000:]}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="the long input; the short one has a tenth")
    parser.add_argument("--workdir", default="", help="a trained workdir (default: train the demo)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t5x_lite_infer_memory_") as tmp:
        workdir = args.workdir
        if not workdir:
            workdir = os.path.join(tmp, "demo")
            command = [sys.executable, "-m", "t5x_lite.train", f"--config={REPO / 'configs' / 'demo.py'}:steps=60"]
            subprocess.run(command + [f"--workdir={workdir}"], env=_env(), check=True, capture_output=True)
        peaks = {}
        for lines in (args.lines // 10, args.lines):
            inputs, outputs = Path(tmp) / f"in_{lines}.txt", Path(tmp) / f"out_{lines}.txt"
            write_inputs(inputs, lines)
            peaks[lines] = peak_rss_of_infer(workdir, inputs, outputs)
            with open(outputs, encoding="utf-8") as f:
                written = sum(1 for _ in f)
            if written != lines:
                raise SystemExit(f"{lines} inputs gave {written} outputs")
            size = inputs.stat().st_size / 2**20
            print(f"{lines:>8,} lines ({size:.1f} MiB): peak RSS {peaks[lines] / 2**20:.0f} MiB, {written:,} outputs")
    short, long = peaks[args.lines // 10], peaks[args.lines]
    print(f"peak RSS ratio ({args.lines:,} / {args.lines // 10:,} lines): {long / short:.2f}")
    return 0 if long / short < 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
