"""Pre-trained against from scratch: score both points of a fine-tuning config's sweep and put them side by side.

    python -m t5x_lite.sweep --config configs/aeslc.py --workdir_root workdirs/aeslc_pair      # trains both points
    python experiments/pretraining_report.py --sweep_root workdirs/aeslc_pair --out experiments/results/aeslc \\
        --metric rougeL --test_splits test --beam_size 4 --alphas 0.6,1.0 --average_last 1

Each point (``scratch=False``: fine-tuned from configs/pretrain_local.py's workdir; ``scratch=True``: the same model
and recipe from a random start) goes through ``translation_report.report``: decoding choices on the validation split
only, each test split decoded once. Writes ``OUT.json`` (both records, the commands, and the test gain of
pre-training for every metric), ``OUT_<point>.json`` (each record) and ``OUT_<point>.png`` (each run's validation
curve). ``--points scratch`` scores one point now and ``--points pretrained`` later, reading the first back from
``OUT_scratch.json``. Hardware: the machine that trained; time: two validation grids and two test decodings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from translation_report import parse_args as report_args  # noqa: E402
from translation_report import report  # noqa: E402

POINTS = {"pretrained": "scratch=False", "scratch": "scratch=True"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep_root", required=True, help="the --workdir_root of the config's sweep")
    parser.add_argument("--out", required=True, help="path prefix of OUT.json and OUT_<point>.png")
    parser.add_argument(
        "--points",
        default=",".join(POINTS),
        help="the points to score now; any other is read back from its OUT_<point>.json of an earlier call (so the "
        "from-scratch run can be scored while the pre-trained one still trains)",
    )
    args, passed = parser.parse_known_args(argv)
    now = args.points.split(",")
    unknown = sorted(set(now) - set(POINTS))
    if unknown:
        raise SystemExit(f"--points: unknown {', '.join(unknown)}; choose from {', '.join(POINTS)}")
    records = {}
    for label, point in POINTS.items():
        saved = f"{args.out}_{label}.json"
        if label not in now:
            if os.path.isfile(saved):
                with open(saved, encoding="utf-8") as f:
                    records[label] = json.load(f)
            continue
        workdir = os.path.join(args.sweep_root, point)
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise SystemExit(f"{workdir} has no checkpoints: run the sweep of the config first (see --help)")
        with open(os.path.join(workdir, "sweep_point.json"), encoding="utf-8") as f:
            command = shlex.join(json.load(f)["command"])  # the sweep records the argv list
        report_argv = ["--workdir", workdir, "--out", f"{args.out}_{label}", "--train_command", command, *passed]
        records[label] = report(report_args(report_argv), report_argv)
        with open(saved, "w", encoding="utf-8") as f:
            json.dump(records[label], f, indent=2)
            f.write("\n")
    missing = [label for label in POINTS if label not in records]
    if missing:
        print(
            f"wrote {', '.join(f'{args.out}_{label}.json' for label in now)}; {args.out}.json waits for "
            f"{', '.join(missing)} (--points {','.join(missing)})"
        )
        return
    metric = records["pretrained"]["selection"]["metric"]
    gain = {
        split: {
            name: value - records["scratch"]["test"][split]["metrics"][name]
            for name, value in result["metrics"].items()
            if name != "examples"
        }
        for split, result in records["pretrained"]["test"].items()
    }
    summary = {
        "task": records["pretrained"]["task"],
        "selection_metric": metric,
        "report_command": "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "test_gain_of_pretraining": gain,
        **records,
    }
    with open(f"{args.out}.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for split in gain:
        for label in POINTS:
            shown = {k: v for k, v in records[label]["test"][split]["metrics"].items() if k != "examples"}
            print(f"{split} {label:10s} " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
