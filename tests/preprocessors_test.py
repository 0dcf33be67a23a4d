"""Span corruption as T5 defined it, the length helper, trimming, and the model features of packed rows."""

from __future__ import annotations

import numpy as np
import pytest

from t5x_lite.data import preprocessors as pp

VOCAB = 32100  # T5: 32,000 pieces + 100 sentinels


def test_length_helper_reproduces_t5_defaults():
    assert pp.span_corruption_lengths(512) == (568, 114)
    assert pp.span_corruption_lengths(512, noise_density=0.5, mean_noise_span_length=3.0)[1] <= 512
    for inputs_length in (64, 128, 256, 1024):
        raw, targets = pp.span_corruption_lengths(inputs_length)
        rng = np.random.default_rng(inputs_length)
        out = pp.span_corruption(rng.integers(3, 1000, raw), VOCAB, rng)
        assert len(out["inputs"]) == inputs_length and len(out["targets"]) == targets


def test_span_corruption_statistics_over_10k_examples():
    """Noise fraction within 0.01 of the density and mean span length within 0.15 of the setting."""
    rng = np.random.default_rng(0)
    noise, total, span_lengths = 0, 0, []
    for _ in range(10_000):
        length = int(rng.integers(20, 600))
        mask = pp.random_spans_noise_mask(length, 0.15, 3.0, rng)
        assert not mask[0], "the first span is kept, as in T5"
        noise += int(mask.sum())
        total += length
        edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
        span_lengths += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert abs(noise / total - 0.15) <= 0.01, noise / total
    assert abs(np.mean(span_lengths) - 3.0) <= 0.15, np.mean(span_lengths)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 50, 568])
def test_span_corruption_reconstructs_exactly(length):
    rng = np.random.default_rng(length)
    for _ in range(200):
        tokens = rng.integers(3, 30000, length).astype(np.int32)
        out = pp.span_corruption(tokens, VOCAB, rng)
        assert out["inputs"][-1] == 1 and out["targets"][-1] == 1
        assert pp.reconstruct_from_spans(out["inputs"], out["targets"], VOCAB) == tokens.tolist()


def test_sentinels_count_down_from_the_top_of_the_vocabulary():
    rng = np.random.default_rng(3)
    out = pp.span_corruption(np.arange(3, 103, dtype=np.int32), VOCAB, rng)
    sentinels_in = [t for t in out["inputs"] if t >= VOCAB - 100]
    sentinels_out = [t for t in out["targets"] if t >= VOCAB - 100]
    assert sentinels_in == list(range(VOCAB - 1, VOCAB - 1 - len(sentinels_in), -1))
    assert sentinels_in == sentinels_out
    assert out["targets"][0] == VOCAB - 1  # targets start with <extra_id_0>


def test_span_corruption_is_a_function_of_the_rng_seed():
    tokens = np.arange(3, 200, dtype=np.int32)
    a = pp.span_corruption(tokens, VOCAB, np.random.default_rng(7))
    b = pp.span_corruption(tokens, VOCAB, np.random.default_rng(7))
    c = pp.span_corruption(tokens, VOCAB, np.random.default_rng(8))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_trim_counts_truncation_and_keeps_eos():
    counter = pp.TruncationCounter()
    counter.seen = 3
    assert pp.trim(np.array([5, 6, 1]), 4, feature="inputs", counter=counter).tolist() == [5, 6, 1]
    assert pp.trim(np.array([5, 6, 7, 8, 1]), 3, feature="inputs", counter=counter).tolist() == [5, 6, 1]
    assert counter.truncated == {"inputs": 1} and counter.longest["inputs"] == 5
    assert "inputs: 1 of 3" in counter.summary()
    with pytest.raises(pp.ExampleTooLongError, match=r"example 17 has 5 targets tokens, more than the maximum 3"):
        pp.trim(np.array([5, 6, 7, 8, 1]), 3, feature="targets", example_id=17, on_overflow="error")
    with pytest.raises(ValueError, match="on_overflow='drop' is unknown"):
        pp.trim(np.array([5, 6, 7, 8, 1]), 3, feature="targets", on_overflow="drop")


def test_model_features_restart_the_decoder_at_each_packed_segment():
    example = {
        "inputs": np.array([[4, 5, 1, 6, 1, 0]]),
        "targets": np.array([[7, 8, 1, 9, 1, 0]]),
        "inputs_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
        "targets_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
        "inputs_positions": np.array([[0, 1, 2, 0, 1, 0]]),
        "targets_positions": np.array([[0, 1, 2, 0, 1, 0]]),
    }
    features = pp.to_model_features(example)
    assert features["decoder_input_tokens"].tolist() == [[0, 7, 8, 0, 9, 0]]
    assert features["decoder_loss_weights"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert features["encoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
    unpacked = pp.to_model_features({"inputs": np.array([[4, 1, 0]]), "targets": np.array([[7, 8, 1]])})
    assert unpacked["decoder_input_tokens"].tolist() == [[0, 7, 8]] and "encoder_segment_ids" not in unpacked
