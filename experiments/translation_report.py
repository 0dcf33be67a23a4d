"""Score a finished run the way papers do, choosing everything on the validation split, and write it up.

    python experiments/translation_report.py --workdir workdirs/multi30k --out experiments/results/multi30k \\
        --train_command "python -m t5x_lite.train --config configs/multi30k.py --workdir workdirs/multi30k"

1. Decoding choices, on the validation split only: beam search with ``--beam_size`` (5, the paper's) over every
   combination of ``--average_last`` (checkpoints averaged, 1 = the last alone) and ``--alphas`` (GNMT length
   penalty); the combination with the best validation ``--metric`` wins (``tok_bleu`` by default; ``rougeL`` for
   summarization: ``--metric rougeL --test_splits test``).
2. The winner decodes each test split once: every metric of the task (for translation tokenized lowercased BLEU,
   ``tok_bleu``, multi-bleu.perl's setting, and sacreBLEU with its signature; for summarization ROUGE-1/2/L/Lsum).
3. Writes ``OUT.json`` (every figure, the commands, commit, machine, wall time) and ``OUT.png`` (validation BLEU and
   loss against wall-clock minutes; matplotlib: ``pip install -e '.[plot]'``). ``OUT.md`` puts them next to the
   published figures and the peers' (written from the JSON).

The wall time is the train command's, from its metrics.jsonl (``perf/launched`` to the last logged row, summed over
the launches of a resumed run); for runs
logged before that field existed, pass ``--wall_minutes`` and ``--log`` (the train command's output, whose progress
bar gives the minute of each step). Hardware: the machine that trained. Time: about 1 minute per decoding of the
validation split with beam 5 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from t5x_lite import metrics, models  # noqa: E402
from t5x_lite.evaluation import evaluate_loaded, load_workdir  # noqa: E402

PUBLISHED = {
    "multi30k_ende_tok": {
        "test_2016_flickr": (
            41.02,
            "Wu et al. (ACL 2021), Transformer-tiny text-only baseline, fairseq, 2 GPUs: LividWo/Revisit-MMT "
            "README-baseline.md (beam 5, average of the last 10 checkpoints)",
        )
    }
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="path prefix of the .json, .md and .png written")
    parser.add_argument("--train_command", default="", help="the command that trained the workdir (recorded)")
    parser.add_argument("--beam_size", type=int, default=5)
    parser.add_argument("--average_last", default="1,3,5,10", help="checkpoint counts to try on validation")
    parser.add_argument("--alphas", default="0.6,1.0,1.4", help="length penalties to try on validation")
    parser.add_argument("--select_split", default="validation")
    parser.add_argument("--metric", default="tok_bleu", help="the validation metric that chooses (higher is better)")
    parser.add_argument("--test_splits", default="test_2016_flickr,test_2017_flickr")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--wall_minutes", type=float, default=0.0, help="the train command's wall time, if not logged")
    parser.add_argument("--log", default="", help="the train command's output, for step times of older runs")
    parser.add_argument("--note", default="", help="free text recorded with the results (e.g. what shared the CPU)")
    return parser.parse_args(argv)


def decode(workdir: str, split: str, average_last: int, settings: models.DecodeSettings, batch_size: int):
    loaded = load_workdir(workdir, average_last=average_last if average_last > 1 else 0)
    return loaded, evaluate_loaded(loaded, split, settings, batch_size)


# ---------------------------------------------------------------------------------------------- the curve


def learning_curve(workdir: str, log: str, wall_minutes: float) -> tuple[list[dict], float | None]:
    """Eval rows with their wall-clock minute of training, and the total wall minutes of the train command(s).

    A resumed run logs one ``perf/launched`` row per launch; each launch counts from its start to its last logged
    row, so the time between a crash and the resume is not counted, while the resume's restore and compile are.
    Rows a crashed launch logged beyond the step its successor resumed from are superseded by the successor's.
    """
    rows = metrics.read_metrics(workdir)
    if rows and "perf/launched" in rows[0] and all("perf/wall_time" in r for r in rows if "eval/loss" in r):
        segments: list[list[dict]] = []
        for row in rows:
            if "perf/launched" in row:
                segments.append([row])
            elif segments:
                segments[-1].append(row)
        evals: dict[int, dict] = {}
        elapsed = 0.0  # minutes of the earlier launches
        for segment in segments:
            start = segment[0]["perf/launched"]
            for row in segment:
                if "eval/loss" in row:
                    evals[row["step"]] = {**row, "minute": elapsed + (row["perf/wall_time"] - start) / 60}
            elapsed += (max(r.get("perf/wall_time", start) for r in segment) - start) / 60
        return [evals[step] for step in sorted(evals)], wall_minutes or elapsed
    evals = [r for r in rows if "eval/loss" in r]
    if not (log and wall_minutes):
        raise SystemExit("metrics.jsonl has no wall-clock times: pass --wall_minutes and --log of the train command")
    elapsed = progress_minutes(log)
    offset = wall_minutes - max(elapsed.values())  # setup and compilation before the loop's progress bar
    for row in evals:
        row["minute"] = offset + elapsed[row["step"]]
    return evals, wall_minutes


def progress_minutes(log: str) -> dict[int, float]:
    """Minutes since the train loop started at each step, from tqdm's ``n/N [mm:ss`` (or ``h:mm:ss``)."""
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    minutes: dict[int, float] = {}
    for step, clock in re.findall(r"\|\s*(\d+)/\d+ \[((?:\d+:)?\d+:\d+)", text):
        parts = [int(p) for p in clock.split(":")]
        seconds = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) == 3 else 0)
        minutes[int(step)] = max(minutes.get(int(step), 0.0), seconds / 60)
    return minutes


def plot(evals: list[dict], path: str, title: str, metric: str = "tok_bleu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minute"] for r in evals]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(minutes, [r[f"eval/{metric}"] for r in evals], "o-", color="tab:blue")
    left.set_xlabel("wall-clock minutes since the train command started")
    label = "BLEU (tokenized lowercased)" if metric == "tok_bleu" else metric
    left.set_ylabel(f"validation {label} (greedy)", color="tab:blue")
    right = left.twinx()
    right.plot(minutes, [r["eval/loss"] for r in evals], "s--", color="tab:red")
    right.set_ylabel("validation loss", color="tab:red")
    left.set_title(title)
    left.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    record = report(args, argv)
    with open(f"{args.out}.json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}.json and {args.out}.png")


def report(args: argparse.Namespace, argv=None) -> dict:
    """Choose on validation, decode the test splits once, plot the curve to ``OUT.png``; the record for OUT.json."""
    counts = [int(n) for n in args.average_last.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    evals, wall = learning_curve(args.workdir, args.log, args.wall_minutes)

    grid = []
    for count in counts:
        for alpha in alphas:
            settings = models.DecodeSettings(beam_size=args.beam_size, alpha=alpha)
            loaded, result = decode(args.workdir, args.select_split, count, settings, args.batch_size)
            grid.append({"average_last": count, "alpha": alpha, "steps": loaded.steps, **result.metrics})
            score = result.metrics[args.metric]
            print(f"{args.select_split}: average_last {count}, alpha {alpha}: {args.metric} {score:.2f}")
    best = max(grid, key=lambda row: row[args.metric])
    settings = models.DecodeSettings(beam_size=args.beam_size, alpha=best["alpha"])
    tests = {}
    for split in args.test_splits.split(","):
        loaded, result = decode(args.workdir, split, best["average_last"], settings, args.batch_size)
        tests[split] = {"metrics": result.metrics, "signatures": result.signatures}
        shown = {k: v for k, v in result.metrics.items() if k in ("tok_bleu", "bleu", "rouge1", "rouge2", "rougeL")}
        print(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))

    task = loaded.task.name
    evaluate_command = (
        f"python -m t5x_lite.evaluate --workdir {args.workdir} --split SPLIT --beam_size {args.beam_size} "
        f"--alpha {best['alpha']:g}" + (f" --average_last {best['average_last']}" if best["average_last"] > 1 else "")
    )
    record = {
        "task": task,
        "date": datetime.date.today().isoformat(),
        "commit": _git("rev-parse", "HEAD"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), jax {jax.__version__}",
        "train_command": args.train_command,
        "evaluate_command": evaluate_command,
        "report_command": "python " + shlex.join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "wall_minutes": wall,
        "launches": sum("perf/launched" in r for r in metrics.read_metrics(args.workdir)),  # > 1: resumed
        "steps": max(r["step"] for r in evals),
        "selection": {
            "split": args.select_split,
            "metric": args.metric,
            "beam_size": args.beam_size,
            "grid": grid,
            "chosen": best,
        },
        "test": tests,
        "validation_curve": [_curve_row(r, args.metric) for r in evals],
        "published": {split: {"tok_bleu": v, "source": s} for split, (v, s) in PUBLISHED.get(task, {}).items()},
        "note": args.note,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(evals, f"{args.out}.png", f"{task}: validation during training", args.metric)
    return record


def _curve_row(row: dict, metric: str) -> dict:
    return {"step": row["step"], "minute": row["minute"], metric: row.get(f"eval/{metric}"), "loss": row["eval/loss"]}


def _git(*command: str) -> str:
    try:
        return subprocess.run(["git", *command], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
