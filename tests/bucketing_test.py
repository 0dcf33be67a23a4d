"""Length-bucketed batches: every example once per epoch, budgets and shapes kept, deterministic and resumable."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from t5x_lite.data import bucketing, pipeline
from t5x_lite.data.pipeline import ProcessShard
from t5x_lite.data.tasks import TaskRegistry


def _lengths(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Sentence-like lengths: mostly 5-30 tokens, a long tail up to 64."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(4.0, 4.0, n).astype(int) + 2, 1, 64)


def _plan(lengths, batch_tokens=512, **kwargs) -> bucketing.BucketPlan:
    kwargs.setdefault("boundaries", bucketing.default_boundaries(64))
    return bucketing.BucketPlan.build(lengths, batch_tokens=batch_tokens, **kwargs)


def test_default_boundaries_cover_the_maximum_and_grow_coarser():
    bounds = bucketing.default_boundaries(100)
    assert bounds[0] == 8 and bounds[-1] == 100 and list(bounds) == sorted(set(bounds))
    steps = np.diff(bounds[:-1])
    assert steps[0] == 4 and steps.max() == 16 and all(np.diff(steps) >= 0)
    assert bucketing.default_boundaries(5) == (5,)
    with pytest.raises(ValueError, match="max_length=0"):
        bucketing.default_boundaries(0)


@pytest.mark.parametrize("row_multiple", [1, 8])
def test_every_example_exactly_once_per_epoch_within_the_budget(row_multiple):
    lengths = _lengths()
    plan = _plan(lengths, row_multiple=row_multiple, seed=3)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert len(batches) == plan.batches_per_epoch
        seen = np.concatenate([indices[indices >= 0] for _, indices in batches])
        assert sorted(seen.tolist()) == list(range(len(lengths))), "an example lost or repeated"
        for bucket, indices in batches:
            rows, length = plan.rows[bucket], plan.boundaries[bucket]
            assert len(indices) == rows and rows % row_multiple == 0 and rows * length <= 512
            assert lengths[indices[indices >= 0]].max() <= length, "an example longer than its bucket"
        empty_rows = sum(int(np.sum(indices < 0)) for _, indices in batches)
        assert empty_rows < plan.rows[-1], "only the epoch's last batch is filled with empty rows"


def test_epochs_differ_and_the_plan_is_a_function_of_the_seed():
    lengths = _lengths()
    plan, again, other = _plan(lengths, seed=1), _plan(lengths, seed=1), _plan(lengths, seed=2)
    first = [indices.tolist() for _, indices in plan.epoch(0)]
    assert first == [indices.tolist() for _, indices in again.epoch(0)]
    assert first != [indices.tolist() for _, indices in plan.epoch(1)]
    assert first != [indices.tolist() for _, indices in other.epoch(0)]


def test_padding_is_small_and_shapes_are_the_used_buckets():
    lengths = _lengths(3000)
    plan = _plan(lengths, batch_tokens=2048)
    assert 0.0 < plan.padding_fraction() < 0.15
    shapes = plan.shapes()
    assert all(rows * length <= 2048 for rows, length in shapes)
    assert len(shapes) == len({bucket for bucket, _ in plan.epoch(0)})


def test_bad_plans_say_what_to_change():
    with pytest.raises(ValueError, match="more than the longest bucket"):
        _plan([10, 70])
    with pytest.raises(ValueError, match="use batch_tokens >= 512"):
        _plan([10, 60], batch_tokens=256, row_multiple=8)
    with pytest.raises(ValueError, match="increasing order"):
        _plan([10], boundaries=(16, 8))
    with pytest.raises(ValueError, match="split is empty"):
        _plan([])


# ------------------------------------------------------------------------------------------- through the pipeline


def _bucketed(task, vocab, **kwargs):
    kwargs = {"batch_size": 8, "seed": 0, "pack": False, "batch_tokens": 256, "split": "validation", **kwargs}
    return pipeline.train_dataset(task, vocab, **kwargs)


def test_an_epoch_of_batches_holds_every_example_once(numbers, vocab):
    plan = pipeline.bucket_plan(numbers, vocab, batch_tokens=256, split="validation")
    batches = list(_bucketed(numbers, vocab, num_epochs=1))
    assert len(batches) == plan.batches_per_epoch
    seen = collections.Counter()
    for batch in batches:
        rows, length = batch["encoder_input_tokens"].shape
        assert rows * length <= 256 and batch["decoder_target_tokens"].shape == (rows, length)
        np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_target_tokens"] > 0)
        for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"], strict=True):
            if targets.any():
                seen[(tuple(inputs[inputs > 0]), tuple(targets[targets > 0]))] += 1
    source = numbers.get_source("validation")
    expected = collections.Counter()
    for index in range(len(source)):
        tokens = numbers.tokenize(source[index], vocab)
        expected[(tuple(tokens["inputs"]), tuple(tokens["targets"]))] += 1
    assert seen == expected


def test_same_seed_same_batches_and_resume_continues_exactly(numbers, vocab):
    first = list(itertools.islice(_bucketed(numbers, vocab), 30))
    again = list(itertools.islice(_bucketed(numbers, vocab), 30))
    other = list(itertools.islice(_bucketed(numbers, vocab, seed=1), 30))
    assert all(
        np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
        for a, b in zip(first, again, strict=True)
    )
    assert not all(
        a["decoder_target_tokens"].shape == b["decoder_target_tokens"].shape
        and np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
        for a, b in zip(first, other, strict=True)
    )
    iterator = iter(_bucketed(numbers, vocab))
    for _ in range(17):
        next(iterator)
    state = pipeline.iterator_state(iterator)
    resumed = pipeline.restore_iterator(_bucketed(numbers, vocab), state)
    for expected in first[17:]:
        got = next(resumed)
        assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


def test_two_processes_produce_the_rows_of_one_global_batch(numbers, vocab):
    whole = list(itertools.islice(_bucketed(numbers, vocab), 10))
    halves = [list(itertools.islice(_bucketed(numbers, vocab, shard=ProcessShard(i, 2)), 10)) for i in range(2)]
    for batch, first, second in zip(whole, *halves, strict=True):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_bucketed_batches_refuse_a_split_too_large_to_hold(numbers, vocab):
    """The generated train split (2**31 - 1 examples) would be tokenized into memory for ever: refused at once."""
    with pytest.raises(ValueError, match=r"'train' has 2,147,483,647 examples.*use batch_tokens=0"):
        pipeline.bucket_plan(numbers, vocab, batch_tokens=256, split="train")


def test_bucketed_batches_refuse_packing_and_span_corruption(numbers, vocab):
    with pytest.raises(ValueError, match="set pack=False"):
        _bucketed(numbers, vocab, pack=True)
    span = TaskRegistry.get("local_span_corruption")
    with pytest.raises(ValueError, match="need one seq2seq task"):
        pipeline.bucket_plan(span, vocab, batch_tokens=256)
