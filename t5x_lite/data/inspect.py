"""Look at a task: decoded examples, token-length percentiles, truncation and packing efficiency.

    python -m t5x_lite.data.inspect --task multi30k_ende --split train --num 3
    python -m t5x_lite.data.inspect --task multi30k_ende_tok --batch_tokens 4096   # length-bucketed batches

The first run trains (and caches) the task's SentencePiece vocabulary from its train split.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from t5x_lite import cli
from t5x_lite.data import pipeline, preprocessors
from t5x_lite.data.tasks import Mixture, TaskRegistry, task_vocabulary


def length_percentiles(lengths: list[int]) -> str:
    values = np.asarray(lengths)
    marks = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
    parts = [f"{name} {np.percentile(values, q):.0f}" for name, q in marks.items()]
    return f"mean {values.mean():.1f}, " + ", ".join(parts) + f", max {values.max()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TaskRegistry.names())}")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=3, help="examples to print")
    parser.add_argument("--stats_examples", type=int, default=2000, help="examples measured for the statistics")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per packed batch for the packing figure")
    parser.add_argument(
        "--batch_tokens", type=int, default=0, help="report length-bucketed batches of this many tokens instead"
    )
    parser.add_argument("--data_dir", default=None, help="local corpora (default: $T5X_LITE_DATA or ../shared/data)")
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--vocab_cache_dir", default=None)
    args = parser.parse_args(argv)

    try:
        task = TaskRegistry.get(args.task)
        if isinstance(task, Mixture):
            raise ValueError(f"{args.task!r} is a mixture; inspect one of its tasks: {', '.join(task.rates)}")
        source = task.get_source(args.split, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir)
        vocab = task_vocabulary(
            task, cache_dir=args.vocab_cache_dir, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir
        )
    except (*cli.EXPECTED_ERRORS, RuntimeError) as error:
        return cli.error_status(error)

    print(f"task {task.name}: {task.description}")
    print(f"split {args.split}: {len(source):,} examples; vocabulary {vocab.vocab_size:,} ids")
    print(f"feature lengths: {dict(task.lengths)}")
    counter = preprocessors.TruncationCounter()
    for index in range(min(args.num, len(source))):
        record = source[index]
        tokens = task.tokenize(record, vocab, rng=np.random.default_rng(index))
        print(f"\n--- example {record.get('id', index)}")
        print(f"inputs  ({len(tokens['inputs'])} tokens): {record['inputs']}")
        if task.objective == "seq2seq":
            print(f"targets ({len(tokens['targets'])} tokens): {record['targets']}")
        print(f"encoded inputs  -> {vocab.decode(tokens['inputs'])}")
        print(f"encoded targets -> {vocab.decode(tokens['targets'])}")

    measured = min(args.stats_examples, len(source))
    input_lengths, target_lengths = [], []
    for index in range(measured):
        record = source[index]
        untrimmed = task.replace_lengths(10**9).tokenize(record, vocab, rng=np.random.default_rng(index))
        input_lengths.append(len(untrimmed["inputs"]))
        target_lengths.append(len(untrimmed["targets"]))
        task.tokenize(record, vocab, rng=np.random.default_rng(index), counter=counter)
    print(f"\ntoken counts over the first {measured:,} examples (with EOS):")
    print(f"  inputs:  {length_percentiles(input_lengths)}")
    print(f"  targets: {length_percentiles(target_lengths)}")
    print(f"  at lengths {dict(task.lengths)}: {counter.summary()}")

    if args.batch_tokens:
        print(bucketing_report(task, vocab, args))
    elif args.split == "train":
        batches = pipeline.train_dataset(
            task, vocab, batch_size=args.batch_size, seed=0, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir
        )
        fill = [preprocessors.packing_efficiency(batch) for batch in itertools.islice(batches, 8)]
        rows = sum(int(batch["decoder_segment_ids"].max(axis=1).sum()) for batch in itertools.islice(batches, 8))
        inputs_fill = np.mean([f["encoder_input_tokens"] for f in fill])
        targets_fill = np.mean([f["decoder_target_tokens"] for f in fill])
        print(
            f"packing ({args.batch_size} rows, 8 batches): {rows / (8 * args.batch_size):.1f} examples per row, "
            f"{100 * inputs_fill:.1f}% of input and {100 * targets_fill:.1f}% of target positions hold tokens"
        )
    return 0


def bucketing_report(task, vocab, args) -> str:
    """Length-bucketed batches of one epoch: how many, their shapes, real tokens and padding per feature."""
    plan = pipeline.bucket_plan(
        task,
        vocab,
        batch_tokens=args.batch_tokens,
        split=args.split,
        data_dir=args.data_dir,
        tfds_data_dir=args.tfds_data_dir,
    )
    lengths = {key: np.asarray([len(plan.examples[i][key]) for i in range(len(plan.examples))]) for key in task.lengths}
    padded = dict.fromkeys(lengths, 0)
    real = dict.fromkeys(lengths, 0)
    rows = 0
    for bucket, indices in plan.epoch(0):
        rows += plan.rows[bucket]
        for key in lengths:
            padded[key] += plan.rows[bucket] * min(plan.boundaries[bucket], task.lengths[key])
            real[key] += int(lengths[key][indices[indices >= 0]].sum())
    batches = plan.batches_per_epoch
    lines = [
        f"length-bucketed batches of <= {args.batch_tokens} tokens ({args.split}, one epoch): {batches} batches, "
        f"{len(plan.examples):,} examples in {rows:,} rows, {len(plan.shapes())} shapes (rows, length) "
        f"{plan.shapes()}",
        f"  per batch: {real['inputs'] / batches:,.0f} input and {real['targets'] / batches:,.0f} target tokens",
    ]
    for key in lengths:
        lines.append(f"  padding fraction, {key}: {100 * (1 - real[key] / padded[key]):.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
