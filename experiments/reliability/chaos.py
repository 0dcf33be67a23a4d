"""Kill a training run with SIGKILL at random moments, restart it with the same command, and check that nothing was
lost: the final parameters equal an uninterrupted run's bitwise, and metrics.jsonl logs each step once with the
uninterrupted run's values.

    python experiments/reliability/chaos.py --cycles 5 [--steps 120] [--seed 0] [--workdir DIR] [--keep]

The run is configs/demo.py (a tiny T5 on the synthetic number task) with frequent asynchronous checkpoints and
evaluations, so that the kills land everywhere. Each cycle aims at one kind of moment, in turn:

- ``step``: a random moment of the training loop (after compilation, away from a save or an evaluation);
- ``save``: while an asynchronous checkpoint save is being written (Orbax's temporary step directory exists);
- ``eval``: during a periodic evaluation (the step's train row is logged, its eval row not yet).

and reports what it hit (the kill's step, the checkpoints on disk, whether a save was in flight). After the last
kill the same command runs to the end. Exit status 0 when everything matches, 1 otherwise. About 4 minutes on
2 CPU cores with the defaults (each restart compiles again); 200 steps leave room for 8 or so cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KINDS = ("step", "save", "eval")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=5, help="kill-and-restart cycles before the final run")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (the run's seed is fixed)")
    parser.add_argument("--workdir", default="", help="where the two runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs")
    return parser.parse_args(argv)


def train_command(workdir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "t5x_lite.train",
        f"--config={REPO / 'configs' / 'demo.py'}:steps={steps}",
        f"--workdir={workdir}",
        "--config.checkpoint_every_steps=10",
        "--config.keep_checkpoints=3",
        "--config.eval_every_steps=20",
        "--config.eval_examples=256",
        "--config.log_every_steps=5",
        f"--config.vocab_cache_dir={workdir.parent / 'vocab_cache'}",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


def metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append({"step": -1, "unparsable": line})
    return rows


def _saving(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())


def _evaluating(workdir: Path, eval_every: int = 20) -> bool:
    rows = metric_rows(workdir)
    trained = {r["step"] for r in rows if "train/loss" in r and r["step"] % eval_every == 0}
    evaluated = {r["step"] for r in rows if "eval/loss" in r}
    return bool(trained - evaluated)


def _steps_on_disk(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _last_step(workdir: Path) -> int:
    return max((r["step"] for r in metric_rows(workdir) if "train/loss" in r), default=0)


def run_until_killed(workdir: Path, steps: int, kind: str, rng: random.Random, budget: float = 10.0) -> dict:
    """Start the run, wait for its training loop, kill it at a moment of ``kind``; what the kill hit."""
    started = time.time()
    log = open(workdir.parent / f"{workdir.name}.log", "a")  # noqa: SIM115
    process = subprocess.Popen(train_command(workdir, steps), stdout=log, stderr=subprocess.STDOUT, env=_env())
    start_step = _last_step(workdir)
    # the training loop runs once a new train row appears (compilation and restore are behind it)
    while process.poll() is None and _last_step(workdir) <= start_step:
        time.sleep(0.01)
    # a step kill comes 0.5-5 s into the loop (some 2-15 steps of the demo here), so that every cycle kills
    deadline = time.time() + (rng.uniform(0.5, 5.0) if kind == "step" else budget)
    hit = None
    while process.poll() is None and time.time() < deadline:
        if kind == "save" and _saving(workdir):
            hit = "save"
            break
        if kind == "eval" and _evaluating(workdir):
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the evaluation
            hit = "eval"
            break
        time.sleep(0.002)
    if process.poll() is not None:
        log.close()
        return {"kind": kind, "hit": "finished before the kill", "seconds": time.time() - started}
    saving = _saving(workdir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    return {
        "kind": kind,
        "hit": hit or ("save" if saving else "step"),
        "save_in_flight": saving,
        "last_logged_step": _last_step(workdir),
        "checkpoints_on_disk": _steps_on_disk(workdir),
        "seconds": round(time.time() - started, 1),
    }


def _run_to_end(workdir: Path, steps: int) -> None:
    with open(workdir.parent / f"{workdir.name}.log", "a") as log:
        done = subprocess.run(train_command(workdir, steps), stdout=log, stderr=subprocess.STDOUT, env=_env())
    if done.returncode != 0:
        log = workdir.parent / f"{workdir.name}.log"
        raise SystemExit(f"the run in {workdir} failed (exit {done.returncode}); see {log}")


def _deterministic(row: dict) -> dict:
    return {
        k: v
        for k, v in row.items()
        if k.startswith(("train/", "eval/")) and "seconds" not in k and "per_s" not in k and "wall" not in k
    }


def compare(reference: Path, chaos: Path) -> list[str]:
    """What differs between the two runs (empty: nothing)."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from t5x_lite import checkpoints

    problems = []
    a, b = checkpoints.load_params(reference), checkpoints.load_params(chaos)
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    if [p for p, _ in flat_a] != [p for p, _ in flat_b]:
        problems.append("the parameter trees differ")
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=False):
        if np.asarray(x).dtype != np.asarray(y).dtype or not np.array_equal(np.asarray(x), np.asarray(y)):
            problems.append(f"parameter {jax.tree_util.keystr(path)} differs")
    for kind in ("train/loss", "eval/loss"):
        rows_a = [r for r in metric_rows(reference) if kind in r]
        rows_b = [r for r in metric_rows(chaos) if kind in r]
        steps_b = [r["step"] for r in rows_b]
        if len(steps_b) != len(set(steps_b)):
            doubled = sorted({s for s in steps_b if steps_b.count(s) > 1})
            problems.append(f"metrics.jsonl logs {kind} more than once at steps {doubled}")
        if [_deterministic(r) | {"step": r["step"]} for r in rows_a] != [
            _deterministic(r) | {"step": r["step"]} for r in rows_b
        ]:
            problems.append(f"the {kind} rows of metrics.jsonl differ from the uninterrupted run's")
    if any("unparsable" in r for r in metric_rows(chaos)):
        problems.append("metrics.jsonl holds a half-written line")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="t5x_lite_chaos_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    reference, chaos = root / "uninterrupted", root / "killed"
    for workdir in (reference, chaos):
        shutil.rmtree(workdir, ignore_errors=True)
    rng = random.Random(args.seed)
    started = time.time()
    _run_to_end(reference, args.steps)
    reference_seconds = time.time() - started
    print(f"uninterrupted run: {args.steps} steps in {reference_seconds:.0f} s ({reference})", flush=True)
    kills = []
    for cycle in range(args.cycles):
        kind = KINDS[cycle % len(KINDS)]
        hit = run_until_killed(chaos, args.steps, kind, rng)
        kills.append(hit)
        print(f"cycle {cycle + 1}: aimed at {kind}: {json.dumps(hit)}", flush=True)
    _run_to_end(chaos, args.steps)
    corrupt = chaos / "checkpoints.corrupt"
    problems = compare(reference, chaos)
    superseded = chaos / "metrics.superseded.jsonl"
    moved = len(superseded.read_text().splitlines()) if superseded.exists() else 0
    killed = sum(1 for k in kills if k["hit"] != "finished before the kill")
    print(
        f"{killed} kills ({', '.join(k['hit'] for k in kills)}), then the same command to the end; "
        f"{moved} metrics rows of killed runs superseded; "
        f"{len(list(corrupt.iterdir())) if corrupt.exists() else 0} checkpoints moved aside"
    )
    if problems:
        print("MISMATCH: " + "; ".join(problems))
    else:
        print(f"final parameters bitwise equal to the uninterrupted run's; metrics.jsonl logs each step once ({root})")
    if not args.keep and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems or killed < args.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
