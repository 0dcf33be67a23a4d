"""The Grain input pipeline: deterministic, checkpointable, sharded across processes.

Training: source -> shuffle (a new permutation every epoch, from the seed) -> repeat -> this process's rows of
each global batch -> tokenize (span corruption draws from a per-example RNG) -> pack or pad -> batch -> model
features. The order is a function of (seed, step) only, and the iterator's state saves and restores exactly.

Evaluation: every example exactly once, in source order; the last batch is padded with masked rows
(``example_mask`` 0, ``example_id`` -1), nothing is dropped or repeated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_experimental

from t5x_lite.data import bucketing, preprocessors
from t5x_lite.data.tasks import Mixture, Task


@dataclasses.dataclass(frozen=True)
class ProcessShard:
    """Which rows of every global batch this process produces: rows [index * local, (index + 1) * local)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_jax(cls) -> ProcessShard:
        import jax

        return cls(jax.process_index(), jax.process_count())

    def local_batch_size(self, global_batch_size: int) -> int:
        if global_batch_size % self.count:
            raise ValueError(
                f"batch_size={global_batch_size} is not divisible by the {self.count} processes; "
                f"use a multiple of {self.count}"
            )
        return global_batch_size // self.count


class _RowsOfProcess(grain.MapDataset):
    """Element j of this process = element ``b * global + index * local + r`` of the parent, j = b * local + r."""

    def __init__(self, parent: grain.MapDataset, shard: ProcessShard, global_batch_size: int):
        super().__init__(parent)
        self._shard = shard
        self._global = global_batch_size
        self._local = shard.local_batch_size(global_batch_size)

    def __len__(self) -> int:
        full, rest = divmod(len(self._parent), self._global)
        return full * self._local + min(max(rest - self._shard.index * self._local, 0), self._local)

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._local)
        return batch * self._global + self._shard.index * self._local + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"RowsOfProcess({self._shard.index}/{self._shard.count}, global_batch={self._global})"


def _tokenized(
    task: Task,
    dataset: grain.MapDataset,
    vocab,
    seed: int,
    counter: preprocessors.TruncationCounter | None,
    on_overflow: str,
) -> grain.MapDataset:
    if task.objective == "span_corruption":
        return dataset.random_map(
            lambda record, rng: task.tokenize(record, vocab, rng=rng, counter=counter, on_overflow=on_overflow),
            seed=seed,
        )
    return dataset.map(lambda record: task.tokenize(record, vocab, counter=counter, on_overflow=on_overflow))


def _pad_example(example: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
    return {key: preprocessors.pad_to(example[key], lengths[key]) for key in ("inputs", "targets")}


def train_dataset(
    task: Task | Mixture,
    vocab,
    *,
    batch_size: int,
    seed: int,
    lengths: Mapping[str, int] | None = None,
    pack: bool = True,
    shard: ProcessShard = ProcessShard(),
    split: str = "train",
    num_epochs: int | None = None,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    counter: preprocessors.TruncationCounter | None = None,
    on_overflow: str = "truncate",
    read_threads: int = 0,
    prefetch: int = 0,
    batch_tokens: int = 0,
    bucket_boundaries: Sequence[int] = (),
    row_multiple: int = 8,
    plan: bucketing.BucketPlan | None = None,
) -> grain.IterDataset:
    """Batches of model features ([local_batch, length] int32 arrays) for training; infinite by default.

    ``read_threads`` > 0 prefetches examples on that many threads; 0 (the default) reads in the calling thread,
    which on a few CPU cores is several times faster than Grain's default of 16 threads (see data_bench.py).
    ``prefetch`` > 0 prepares that many batches ahead on a background thread, overlapping the train step; the
    iterator state still points at the next batch the caller will receive.

    ``batch_tokens`` > 0 replaces ``batch_size`` rows of fixed length by length-bucketed batches of at most that
    many padded tokens (``bucketing.py``; ``row_multiple`` divides every batch's rows, ``bucket_boundaries`` are
    the padded lengths, default ``bucketing.default_boundaries``; ``plan``, from ``bucket_plan`` with the same
    arguments, saves measuring the split again); ``pack`` must then be False.
    """
    if batch_tokens:
        if pack:
            raise ValueError(
                f"batch_tokens={batch_tokens} makes length-bucketed batches, which are not packed; set pack=False"
            )
        plan = plan or bucket_plan(
            task,
            vocab,
            batch_tokens=batch_tokens,
            boundaries=bucket_boundaries,
            row_multiple=row_multiple,
            seed=seed,
            split=split,
            data_dir=data_dir,
            tfds_data_dir=tfds_data_dir,
            lengths=lengths,
            counter=counter,
            on_overflow=on_overflow,
        )
        batches = bucketing.BucketedBatches(
            plan,
            _feature_lengths(task, lengths),
            shard_index=shard.index,
            shard_count=shard.count,
            num_epochs=num_epochs,
        )
        stream = batches.map(preprocessors.to_model_features).to_iter_dataset(grain.ReadOptions(num_threads=0))
        if prefetch:
            stream = grain_experimental.ThreadPrefetchIterDataset(stream, prefetch_buffer_size=prefetch)
        return stream
    local_batch = shard.local_batch_size(batch_size)
    if isinstance(task, Mixture):
        parts = [
            _shuffled_tokens(t, vocab, split, seed + i, num_epochs, data_dir, tfds_data_dir, counter, on_overflow)
            for i, t in enumerate(task.tasks())
        ]
        dataset = grain.MapDataset.mix(parts, weights=task.weights(data_dir=data_dir, tfds_data_dir=tfds_data_dir))
        lengths = lengths or task.tasks()[0].lengths
    else:
        dataset = _shuffled_tokens(task, vocab, split, seed, num_epochs, data_dir, tfds_data_dir, counter, on_overflow)
        lengths = lengths or task.lengths
    dataset = _RowsOfProcess(dataset, shard, batch_size)
    lengths = {"inputs": int(lengths["inputs"]), "targets": int(lengths["targets"])}
    read_options = grain.ReadOptions(num_threads=read_threads)
    if pack:
        stream = grain_experimental.FirstFitPackIterDataset(
            dataset.to_iter_dataset(read_options),
            length_struct=lengths,
            num_packing_bins=local_batch,
            shuffle_bins=False,
        )
    else:
        stream = dataset.map(lambda example: _pad_example(example, lengths)).to_iter_dataset(read_options)
    batches = stream.batch(local_batch, drop_remainder=True).map(preprocessors.to_model_features)
    if prefetch:
        batches = grain_experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return batches


def bucket_plan(
    task: Task | Mixture,
    vocab,
    *,
    batch_tokens: int,
    boundaries: Sequence[int] = (),
    row_multiple: int = 8,
    seed: int = 0,
    split: str = "train",
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    lengths: Mapping[str, int] | None = None,
    counter: preprocessors.TruncationCounter | None = None,
    on_overflow: str = "truncate",
) -> bucketing.BucketPlan:
    """The length buckets of a seq2seq task's split: tokenizes the whole split once, into memory, and measures it."""
    examples = _tokenized_split(task, vocab, split, seed, data_dir, tfds_data_dir, counter, on_overflow, lengths)
    examples = bucketing.TokenizedExamples.collect(examples)
    feature_lengths = _feature_lengths(task, lengths)
    return bucketing.BucketPlan.build(
        examples.lengths(),
        batch_tokens=batch_tokens,
        boundaries=tuple(boundaries) or bucketing.default_boundaries(max(feature_lengths.values())),
        row_multiple=row_multiple,
        seed=seed,
        examples=examples,
    )


def most_frequent_tokens(
    task: Task | Mixture,
    vocab,
    count: int,
    *,
    feature: str = "targets",
    split: str = "train",
    max_examples: int = 50_000,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
) -> tuple[int, ...]:
    """The ids of the ``count`` tokens most frequent in ``feature`` of a seq2seq task's split (its first
    ``max_examples`` examples in source order; ties: the lower id), in increasing id order, fewer when fewer distinct
    tokens occur. Chooses a LoRA run's trainable token-table rows (``TransformerConfig.lora_rows``)."""
    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    if isinstance(task, Mixture) or task.objective != "seq2seq":
        raise ValueError(f"task {task.name!r}: token frequencies are counted on one seq2seq task's split")
    source = task.get_source(split, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    counts = np.zeros(vocab.vocab_size, np.int64)
    for index in range(min(len(source), max_examples)):
        np.add.at(counts, np.asarray(task.tokenize(source[index], vocab)[feature], np.int64), 1)
    ranked = np.lexsort((np.arange(counts.size), -counts))  # by count, descending; then by id
    return tuple(sorted(int(i) for i in ranked[:count] if counts[i] > 0))


def bucket_batch_shapes(plan: bucketing.BucketPlan, lengths: Mapping[str, int]) -> list[dict[str, tuple[int, int]]]:
    """The global shape of every model feature in each batch shape of ``plan`` (for ahead-of-time compilation)."""
    shapes = []
    for rows, length in plan.shapes():
        inputs, targets = min(length, int(lengths["inputs"])), min(length, int(lengths["targets"]))
        shapes.append(
            {
                "encoder_input_tokens": (rows, inputs),
                "decoder_input_tokens": (rows, targets),
                "decoder_target_tokens": (rows, targets),
                "decoder_loss_weights": (rows, targets),
            }
        )
    return shapes


def _feature_lengths(task: Task, lengths: Mapping[str, int] | None) -> dict[str, int]:
    lengths = lengths or task.lengths
    return {"inputs": int(lengths["inputs"]), "targets": int(lengths["targets"])}


# Length-bucketed batching measures the whole split in memory (a few bytes per token): WMT-sized corpora fit, a
# generated split of 2**31 examples does not.
BUCKETED_MAX_EXAMPLES = 100_000_000


def _tokenized_split(
    task: Task | Mixture,
    vocab,
    split: str,
    seed: int,
    data_dir: str | None,
    tfds_data_dir: str | None,
    counter: preprocessors.TruncationCounter | None,
    on_overflow: str,
    lengths: Mapping[str, int] | None = None,
) -> grain.MapDataset:
    """A seq2seq task's split, tokenized on access, in source order (bucketed batching shuffles by itself)."""
    if isinstance(task, Mixture) or task.objective != "seq2seq":
        raise ValueError(
            f"task {task.name!r}: length-bucketed batches (batch_tokens > 0) need one seq2seq task; "
            "use batch_tokens=0 with pack=True for mixtures and span corruption"
        )
    if lengths:
        task = dataclasses.replace(task, lengths=_feature_lengths(task, lengths))
    source = task.get_source(split, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    if len(source) == 0:
        raise ValueError(f"task {task.name!r}: split {split!r} is empty")
    if len(source) > BUCKETED_MAX_EXAMPLES:  # e.g. a generated split: tokenizing it would run for hours, or for ever
        raise ValueError(
            f"task {task.name!r}: split {split!r} has {len(source):,} examples; length-bucketed batches "
            f"(batch_tokens > 0) tokenize the whole split into memory first and take at most "
            f"{BUCKETED_MAX_EXAMPLES:,}: use batch_tokens=0 (packed or fixed-size batches) or a smaller split"
        )
    return _tokenized(task, grain.MapDataset.source(source), vocab, seed, counter, on_overflow)


def _shuffled_tokens(
    task: Task,
    vocab,
    split: str,
    seed: int,
    num_epochs: int | None,
    data_dir: str | None,
    tfds_data_dir: str | None,
    counter: preprocessors.TruncationCounter | None,
    on_overflow: str,
) -> grain.MapDataset:
    source = task.get_source(split, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    if len(source) == 0:
        raise ValueError(f"task {task.name!r}: split {split!r} is empty")
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    return _tokenized(task, dataset, vocab, seed, counter, on_overflow)


def eval_dataset(
    task: Task,
    vocab,
    split: str,
    *,
    batch_size: int,
    lengths: Mapping[str, int] | None = None,
    shard: ProcessShard = ProcessShard(),
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    counter: preprocessors.TruncationCounter | None = None,
) -> grain.MapDataset:
    """Every example of ``split`` exactly once, in order, in padded batches with ``example_mask``/``example_id``.

    Inputs longer than the task's length are truncated and counted in ``counter`` (never dropped); the
    references stay as text in the source for scoring.
    """
    local_batch = shard.local_batch_size(batch_size)
    lengths = lengths or task.lengths
    lengths = {"inputs": int(lengths["inputs"]), "targets": int(lengths["targets"])}
    source = task.get_source(split, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    num_examples = len(source)
    num_batches = -(-num_examples // batch_size)
    padded_length = num_batches * batch_size

    def example(index: int) -> dict[str, np.ndarray]:
        if index >= num_examples:  # padding row of the last batch
            return {
                "inputs": np.zeros(lengths["inputs"], np.int32),
                "targets": np.zeros(lengths["targets"], np.int32),
                "example_id": np.int32(-1),
                "example_mask": np.float32(0),
            }
        tokens = task.tokenize(source[index], vocab, counter=counter, rng=np.random.default_rng(index))
        padded = _pad_example(tokens, lengths)
        padded.update(example_id=np.int32(index), example_mask=np.float32(1))
        return padded

    dataset = _RowsOfProcess(grain.MapDataset.range(padded_length), shard, batch_size).map(example)

    def features(batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out = preprocessors.to_model_features(batch)
        out["example_id"] = np.asarray(batch["example_id"], np.int32)
        out["example_mask"] = np.asarray(batch["example_mask"], np.float32)
        out["decoder_loss_weights"] = out["decoder_loss_weights"] * out["example_mask"][:, None]
        return out

    return dataset.batch(local_batch, drop_remainder=False).map(features)


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """A JSON-serializable snapshot of where ``iterator`` stands (saved inside checkpoints)."""
    return iterator.get_state()


def restore_iterator(dataset: grain.IterDataset, state: Mapping[str, Any]) -> grain.DatasetIterator:
    """A fresh iterator of ``dataset`` positioned exactly where ``state`` was taken."""
    iterator = iter(dataset)
    iterator.set_state(dict(state))
    return iterator
