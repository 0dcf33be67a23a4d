"""The Grain pipeline: determinism in (seed, step), exact resume, full eval coverage, per-process slices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from t5x_lite.data import pipeline, preprocessors
from t5x_lite.data.pipeline import ProcessShard
from t5x_lite.data.tasks import TaskRegistry


def _take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_first_100_batches_other_seed_differs(numbers, vocab):
    make = lambda seed: pipeline.train_dataset(numbers, vocab, batch_size=8, seed=seed)
    first, again, other = _take(make(1), 100), _take(make(1), 100), _take(make(2), 100)
    assert all(_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(_equal(a, b) for a, b in zip(first, other, strict=True))
    batch = first[0]
    assert batch["encoder_input_tokens"].shape == (8, 32) and batch["decoder_target_tokens"].shape == (8, 32)
    assert batch["encoder_segment_ids"].max() > 1, "short examples are packed several to a row"


def test_restored_iterator_continues_exactly(numbers, vocab):
    dataset = pipeline.train_dataset(numbers, vocab, batch_size=4, seed=3)
    iterator = iter(dataset)
    _take_from = lambda it, n: [next(it) for _ in range(n)]
    _take_from(iterator, 7)
    state = pipeline.iterator_state(iterator)
    expected = _take_from(iterator, 5)
    resumed = pipeline.restore_iterator(pipeline.train_dataset(numbers, vocab, batch_size=4, seed=3), state)
    assert all(_equal(a, b) for a, b in zip(expected, _take_from(resumed, 5), strict=True))


def test_epochs_are_reshuffled_from_the_seed(shared_data, vocab):
    del shared_data
    task = TaskRegistry.get("multi30k_ende")
    source = task.get_source("validation")
    # One unpacked batch is exactly one epoch of the split.
    dataset = pipeline.train_dataset(task, vocab, batch_size=len(source), seed=0, pack=False, split="validation")
    epoch_1, epoch_2 = _take(dataset, 2)
    assert not np.array_equal(epoch_1["encoder_input_tokens"], epoch_2["encoder_input_tokens"])
    rows = lambda b: sorted(map(tuple, b["encoder_input_tokens"].tolist()))
    assert rows(epoch_1) == rows(epoch_2), "each epoch is a permutation of the same examples"


@pytest.mark.parametrize("pack", [False, True])
def test_process_slices_are_disjoint_and_together_the_global_batch(numbers, vocab, pack):
    whole = _take(pipeline.train_dataset(numbers, vocab, batch_size=8, seed=5, pack=pack), 6)
    parts = [
        _take(pipeline.train_dataset(numbers, vocab, batch_size=8, seed=5, pack=pack, shard=ProcessShard(i, 2)), 6)
        for i in range(2)
    ]
    for step in range(6):
        local = [parts[i][step] for i in range(2)]
        assert all(p["encoder_input_tokens"].shape[0] == 4 for p in local)
        if not pack:  # unpacked rows are examples: the two halves are exactly the global batch
            joined = {k: np.concatenate([p[k] for p in local]) for k in local[0]}
            assert _equal(joined, whole[step])
        rows = [set(map(tuple, p["encoder_input_tokens"].tolist())) for p in local]
        assert not rows[0] & rows[1]
    with pytest.raises(ValueError, match="batch_size=9 is not divisible by the 2 processes"):
        pipeline.train_dataset(numbers, vocab, batch_size=9, seed=5, shard=ProcessShard(0, 2))


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_covers_every_example_exactly_once(numbers, vocab, processes):
    source = numbers.get_source("validation")
    ids, masked = [], 0
    for index in range(processes):
        dataset = pipeline.eval_dataset(
            numbers, vocab, "validation", batch_size=64, shard=ProcessShard(index, processes)
        )
        for batch in dataset:
            assert batch["encoder_input_tokens"].shape[0] == 64 // processes
            real = batch["example_mask"] > 0
            ids += batch["example_id"][real].tolist()
            masked += int((~real).sum())
            assert (batch["decoder_loss_weights"][~real] == 0).all()
    assert sorted(ids) == list(range(len(source)))
    assert masked == -len(source) % 64


def test_eval_tokens_match_the_source_in_order(numbers, vocab):
    source = numbers.get_source("test")
    batch = next(iter(pipeline.eval_dataset(numbers, vocab, "test", batch_size=4)))
    for row, example_id in enumerate(batch["example_id"]):
        record = source[int(example_id)]
        assert vocab.decode(batch["decoder_target_tokens"][row]) == record["targets"].strip()


def test_truncation_is_counted_and_overflow_can_be_refused(numbers, vocab):
    counter = preprocessors.TruncationCounter()
    short = numbers.replace_lengths(6)
    _take(pipeline.train_dataset(short, vocab, batch_size=4, seed=0, pack=False, counter=counter), 3)
    assert counter.truncated.get("inputs", 0) > 0 and counter.seen >= 12
    with pytest.raises(
        preprocessors.ExampleTooLongError, match=r"example \d+ has \d+ inputs tokens, more than the maximum 6"
    ):
        _take(pipeline.train_dataset(short, vocab, batch_size=4, seed=0, pack=False, on_overflow="error"), 20)


def test_unknown_task_and_split_are_named():
    with pytest.raises(ValueError, match=r"unknown task 'multi30k_xx'; registered tasks: .*multi30k_ende"):
        TaskRegistry.get("multi30k_xx")
    with pytest.raises(
        ValueError, match=r"task 'synthetic_numbers' has no split 'dev'; it has train, validation, test"
    ):
        TaskRegistry.get("synthetic_numbers").get_source("dev")


def test_adding_a_task_is_one_call(tmp_path, vocab):
    (tmp_path / "train.src").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "train.tgt").write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    try:
        TaskRegistry.add(
            "my_tiny_task",
            splits={"train": ("text_files", "train")},
            source_options={"source_path": str(tmp_path / "train.src"), "target_path": str(tmp_path / "train.tgt")},
            lengths={"inputs": 8, "targets": 8},
        )
        batch = next(iter(pipeline.train_dataset(TaskRegistry.get("my_tiny_task"), vocab, batch_size=2, seed=0)))
        assert batch["encoder_input_tokens"].shape == (2, 8)
        with pytest.raises(ValueError, match="already registered"):
            TaskRegistry.add("my_tiny_task", splits={"train": ("text_files", "train")})
    finally:
        TaskRegistry.remove("my_tiny_task")


def test_mixture_draws_from_every_task(numbers, vocab, tmp_path):
    TaskRegistry.add("numbers_copy", splits=dict(numbers.splits), source_options={"seed": 9}, lengths=numbers.lengths)
    try:
        mixture = TaskRegistry.add_mixture("numbers_mix", {"synthetic_numbers": 1.0, "numbers_copy": 1.0})
        batches = _take(pipeline.train_dataset(mixture, vocab, batch_size=4, seed=0, pack=False), 5)
        assert len(batches) == 5
    finally:
        TaskRegistry.remove("numbers_mix")
        TaskRegistry.remove("numbers_copy")


def test_span_corruption_task_through_the_pipeline(shared_data, tmp_path):
    del shared_data
    task = TaskRegistry.get("local_span_corruption")
    assert dict(task.lengths) == {"inputs": 64, "targets": task.lengths["targets"]}
    from t5x_lite.data.vocab import train_vocabulary

    source = task.get_source("train")
    texts = [source[i]["inputs"] for i in range(3000)]
    vocab = train_vocabulary(texts, vocab_size=500, cache_dir=str(tmp_path), name="caption_en")
    a = _take(pipeline.train_dataset(task, vocab, batch_size=4, seed=0), 3)
    b = _take(pipeline.train_dataset(task, vocab, batch_size=4, seed=0), 3)
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    sentinel = vocab.extra_id(0)
    assert (a[0]["decoder_target_tokens"] == sentinel).any() and (a[0]["encoder_input_tokens"] == sentinel).any()
