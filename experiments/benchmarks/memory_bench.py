"""Peak host memory (RSS) of the demo training and of t5_small training, each in a fresh subprocess.

The peak resident set size of a child process is read with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``
after it exits, with one child per measurement. The demo run is what ``make demo`` trains, without the venv
set-up. The t5_small run trains t5_small v1.0 (60.5M parameters) on the demo task for ``--steps`` steps at
batch 8.

    python experiments/benchmarks/memory_bench.py              # about 85 s on 2 idle CPU cores (QUIET, 2026-12-02)
    python experiments/benchmarks/memory_bench.py --quick      # the demo for 50 steps only

For the compiled temporary memory by ``remat_policy``, see compile_bench.py. The measured figures are in
experiments/benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``command`` run alone in a fresh child process."""
    code = (
        "import resource, subprocess, sys\n"
        f"done = subprocess.run({command!r}, cwd={REPO!r}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, "
        "text=True)\n"
        "if done.returncode: sys.exit(done.stderr[-2000:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr}")
    return int(out.stdout.strip()) / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="t5_small training steps")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    train = [sys.executable, "-m", "t5x_lite.train", "--config", "configs/demo.py"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"demo (make demo's training, 600 steps)": train + ["--workdir", f"{tmp}/demo"]}
        if args.quick:
            runs = {"demo, 50 steps": train + ["--workdir", f"{tmp}/demo", "--config.num_train_steps=50"]}
        else:
            runs[f"t5_small on the demo task, batch 8, {args.steps} steps"] = train + [
                "--workdir",
                f"{tmp}/small",
                "--config.model=t5_small",
                "--config.batch_size=8",
                f"--config.num_train_steps={args.steps}",
                f"--config.decay_steps={args.steps}",
                "--config.warmup_steps=5",
                "--config.eval_every_steps=100000",
                "--config.eval_examples=64",
                "--config.eval_batch_size=32",
            ]
        for name, command in runs.items():
            rss, seconds = peak_rss_of(command)
            print(f"{name}: peak RSS {rss:,.0f} MiB ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
