"""Sequence-level distillation data (Kim & Rush 2016): a teacher's beam outputs for a training split, as a task.

    python -m t5x_lite.distill_data --teacher DIR --out DATA_DIR [--beam_size 4 --alpha 1.0 --average_last N]
    python -m t5x_lite.train --config CONFIG --config.task=distilled:DATA_DIR --config.vocab_task=TASK ...

Writes ``DATA_DIR/train.src`` (the split's inputs, one per line, as the task reads them), ``train.tgt`` (the
teacher's beam search output for each) and ``task.json``. ``distilled:DATA_DIR`` is then a task: the teacher's
task with its train split replaced by these pairs; its validation and test splits (and so every score) stay the
original references. Pass the teacher task as ``vocab_task`` so that the student keeps the teacher's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from t5x_lite import cli, fileio, models
from t5x_lite.evaluation import evaluate_loaded, load_workdir

PREFIX = "distilled:"


def write_distillation_data(
    teacher: str,
    out: str,
    *,
    split: str = "train",
    beam_size: int = 4,
    alpha: float = 1.0,
    average_last: int = 0,
    batch_size: int = 128,
    max_examples: int = 0,
) -> dict[str, Any]:
    """Decode ``split`` of ``teacher``'s task with beam search and write the pairs and ``task.json`` to ``out``."""
    if os.path.exists(os.path.join(out, "task.json")):
        raise FileExistsError(f"{out}/task.json exists: choose another --out or remove it")
    loaded = load_workdir(teacher, average_last=average_last)
    if split not in loaded.task.splits:
        raise ValueError(f"the teacher's task {loaded.task.name!r} has no split {split!r}")
    settings = models.DecodeSettings(beam_size=beam_size, alpha=alpha)
    result = evaluate_loaded(loaded, split, settings, batch_size, max_examples=max_examples, progress=True)
    os.makedirs(out, exist_ok=True)
    for name, lines in (("train.src", [r["inputs"] for r in result.records]), ("train.tgt", result.predictions)):
        if any("\n" in line for line in lines):
            raise ValueError(f"a line of {name} holds a newline; the text_files format cannot store it")
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    record = {
        "base_task": loaded.task.name,
        "teacher": str(fileio.workdir_path(teacher)),
        "teacher_steps": list(loaded.steps),
        "split": split,
        "examples": len(result.predictions),
        "decoding": {"beam_size": beam_size, "alpha": alpha},
        "teacher_metrics_on_split": result.metrics,
    }
    with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


def distilled_task(name: str):
    """The task ``distilled:DIR``: the base task of ``DIR/task.json`` training on ``DIR/train.{src,tgt}``."""
    import dataclasses

    from t5x_lite.data.tasks import TaskRegistry

    folder = name[len(PREFIX) :]
    path = os.path.join(folder, "task.json")
    if not os.path.isfile(path):
        raise ValueError(f"task {name!r}: {path} not found; write it with python -m t5x_lite.distill_data")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    base = TaskRegistry.get(record["base_task"])
    # The base's source options move to its own splits: the train split reads text files with options of its own.
    split_options = {split: {**base.source_options, **base.split_options.get(split, {})} for split in base.splits}
    split_options["train"] = {
        "source_path": os.path.join(folder, "train.src"),
        "target_path": os.path.join(folder, "train.tgt"),
    }
    return dataclasses.replace(
        base,
        name=name,
        splits={**base.splits, "train": ("text_files", "train")},
        source_options={},
        split_options=split_options,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.distill_data", description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="a trained workdir")
    parser.add_argument("--out", required=True, help="folder for train.src, train.tgt and task.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--average_last", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_examples", type=int, default=0, help="0: the whole split (needed for endless ones)")
    args = parser.parse_args(argv)
    try:
        record = write_distillation_data(
            args.teacher,
            args.out,
            split=args.split,
            beam_size=args.beam_size,
            alpha=args.alpha,
            average_last=args.average_last,
            batch_size=args.batch_size,
            max_examples=args.max_examples,
        )
    except cli.EXPECTED_ERRORS as error:
        return cli.error_status(error)
    print(
        f"wrote {record['examples']:,} teacher outputs of {record['base_task']}/{record['split']} to {args.out}\n"
        f"train on them: python -m t5x_lite.train --config CONFIG --config.task={PREFIX}{args.out} "
        f"--config.vocab_task={record['base_task']} ..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
