"""Time to the first train step: process start -> train state created -> first step done, cold and warm cache.

Each measurement is a fresh Python process that does what ``t5x_lite.train`` does before its loop: import,
turn on the persistent compilation cache (``t5x_lite/compile_cache.py``) in a folder of this run, create the
train state on a 1-device mesh (parameters and Adafactor state, as ``trainer.create_train_state``), then compile
and run one train step on a batch of 8 x 128 / 128 tokens. The first process finds the folder empty (a first
start on a new machine); the second finds what the first wrote (a restart, a resume, the next sweep point).

    ../shared/tools/quiet-run -- python experiments/benchmarks/startup_bench.py    # t5_small, t5_v1_1_base
    python experiments/benchmarks/startup_bench.py --models t5_tiny --batch 2 --length 16    # seconds

Prints one line per process and model: import, state creation (of which the initializer's compile), first step.
Hardware: any; the figures in experiments/benchmarks/NOTES.md are from the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import jax, jax.numpy as jnp
from t5x_lite.presets import get_model_config
from experiments.benchmarks.train_bench import make_batch
from t5x_lite import compile_cache, network, optimizers, partitioning, trainer
model, cache, rows, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
compile_cache.enable(cache)
imported = time.perf_counter()
cfg = get_model_config(model)
config = {"optimizer": "adafactor", "learning_rate": 1e-3, "schedule": "constant"}
tx = optimizers.make_optimizer(config, logical_axes=network.param_logical_axes(cfg))
mesh, rules = partitioning.make_mesh((1, 1, 1)), "data_parallel"
state = trainer.create_train_state(cfg, tx, jax.random.key(0), mesh, rules)
jax.block_until_ready(state)
created = time.perf_counter()
step = trainer.compile_train_step(cfg, tx, mesh, rules, schedule=optimizers.make_schedule(config))
batch = make_batch(cfg.vocab_size, rows, length, length)
with partitioning.activate(mesh, rules):
    state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
stepped = time.perf_counter()
print(json.dumps({"import": imported - start, "state": created - imported, "first_step": stepped - created,
                  "total": stepped - start, "loss": float(metrics["loss"])}))
"""


def measure(model: str, cache: str, rows: int, length: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model, cache, str(rows), str(length)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"the {model} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="t5_small,t5_v1_1_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"start -> first train step, batch {args.batch} x {args.length}/{args.length}, Adafactor, 1 device")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="t5x_lite_startup_") as cache:
            runs = [("cold cache", measure(model, cache, args.batch, args.length))]
            runs.append(("warm cache", measure(model, cache, args.batch, args.length)))
        for label, r in runs:
            print(
                f"{model:14s} {label}: import {r['import']:5.1f} s  state created {r['state']:5.1f} s  "
                f"first step {r['first_step']:5.1f} s  total {r['total']:5.1f} s  (loss {r['loss']:.4f})",
                flush=True,
            )
        assert runs[0][1]["loss"] == runs[1][1]["loss"], "a cached program changed the numbers"


if __name__ == "__main__":
    main()
