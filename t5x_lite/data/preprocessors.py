"""Example-level transformations: task prefix, tokenize, trim with counted truncation, T5 span corruption,
and the final model features (shifted decoder inputs, loss weights) of possibly packed examples.

Span corruption follows Raffel et al. (2020) and its reference implementation exactly: ``noise_density`` of the
tokens, in spans of mean length ``mean_noise_span_length``, spans and gaps drawn by random segmentation, each
noise span replaced in the inputs by one sentinel counted down from the top of the vocabulary and reproduced after
that sentinel in the targets.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------- text and tokens


def add_prefix(text: str, prefix: str) -> str:
    """T5's task prefix, e.g. ``translate English to German: ``."""
    return f"{prefix}{text}" if prefix else text


@dataclasses.dataclass
class TruncationCounter:
    """Counts examples trimmed to the maximum length, per feature: truncation is reported, never silent."""

    seen: int = 0
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)
    longest: dict[str, int] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, feature: str, length: int, max_length: int) -> None:
        with self._lock:
            self.longest[feature] = max(self.longest.get(feature, 0), length)
            if length > max_length:
                self.truncated[feature] = self.truncated.get(feature, 0) + 1

    def summary(self) -> str:
        if not any(self.truncated.values()):
            return f"no example truncated ({self.seen} seen)"
        parts = [
            f"{feature}: {count} of {self.seen} "
            f"({100 * count / max(self.seen, 1):.2f}%, longest {self.longest[feature]})"
            for feature, count in sorted(self.truncated.items())
        ]
        return "truncated " + "; ".join(parts)


class ExampleTooLongError(ValueError):
    """An example exceeds the maximum length and the task says to refuse rather than truncate."""


def trim(
    tokens: np.ndarray,
    max_length: int,
    *,
    feature: str,
    example_id: int | None = None,
    counter: TruncationCounter | None = None,
    on_overflow: str = "truncate",
) -> np.ndarray:
    """Keep at most ``max_length`` tokens, ending with EOS when the input did; count or refuse overflows."""
    length = len(tokens)
    if counter is not None:
        counter.record(feature, length, max_length)
    if length <= max_length:
        return tokens
    if on_overflow == "error":
        where = f"example {example_id}" if example_id is not None else "an example"
        raise ExampleTooLongError(
            f"{where} has {length} {feature} tokens, more than the maximum {max_length}; raise the task's "
            f"{feature} length or set on_overflow='truncate'"
        )
    if on_overflow != "truncate":
        raise ValueError(f"on_overflow={on_overflow!r} is unknown; use 'truncate' or 'error'")
    trimmed = np.array(tokens[:max_length])
    if tokens[-1] == 1:  # keep the end-of-sequence marker so the model still learns to stop
        trimmed[-1] = 1
    return trimmed


def append_eos(tokens: Sequence[int], eos_id: int = 1) -> np.ndarray:
    return np.asarray([*tokens, eos_id], np.int32)


# ----------------------------------------------------------------------------------------------- span corruption


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw tokens per example, targets length) so that span corruption yields exactly ``inputs_length`` inputs.

    Both lengths count the EOS appended to inputs and targets; with T5's defaults 512 -> (568, 114).
    """

    def lengths_of(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        # Inputs: every kept token, one sentinel per span, EOS. Targets: every noise token, one sentinel per span, EOS.
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths_of(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths_of(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        # With half the tokens noised the targets would come out one longer than the inputs: keep them equal.
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (each >= 1, summing to num_items) of a uniformly random split of num_items into num_segments."""
    first_in_segment = np.zeros(num_items, np.int64)
    starts = rng.permutation(num_items - 1)[: num_segments - 1] + 1
    first_in_segment[starts] = 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of the tokens to noise: alternating kept and noise spans, starting with a kept span."""
    original_length = length
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, np.int64)
    indicator[span_starts] = 1
    return (np.cumsum(indicator) % 2 == 1)[:original_length]


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Replace each masked span by one sentinel (vocab_size - 1, vocab_size - 2, ...) and drop the rest of it."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    sentinels = vocab_size - np.cumsum(first)  # first span -> vocab_size - 1, i.e. <extra_id_0>
    out = np.where(first, sentinels, tokens)
    return out[~(mask & previous)].astype(np.int32)


def span_corruption(
    tokens: np.ndarray,
    vocab_size: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    eos_id: int = 1,
) -> dict[str, np.ndarray]:
    """T5's span corruption of raw ``tokens`` (no EOS): ``{'inputs', 'targets'}`` each ending with EOS."""
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) == 0:
        return {"inputs": np.array([eos_id], np.int32), "targets": np.array([eos_id], np.int32)}
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    inputs = _spans_to_sentinels(tokens, mask, vocab_size)
    targets = _spans_to_sentinels(tokens, ~mask, vocab_size)
    return {"inputs": append_eos(inputs, eos_id), "targets": append_eos(targets, eos_id)}


def reconstruct_from_spans(
    inputs: Sequence[int], targets: Sequence[int], vocab_size: int, num_sentinels: int = 100
) -> list[int]:
    """The original tokens of a span-corrupted pair: each sentinel in ``inputs`` replaced by its span in ``targets``."""
    lowest_sentinel = vocab_size - num_sentinels

    def split_by_sentinel(sequence: Sequence[int]) -> dict[int, list[int]]:
        spans: dict[int, list[int]] = {}
        current: int | None = None
        for token in sequence:
            if token == 1:
                break
            if token >= lowest_sentinel:
                current = int(token)
                spans[current] = []
            elif current is not None:
                spans[current].append(int(token))
        return spans

    spans = split_by_sentinel(targets)
    out: list[int] = []
    for token in inputs:
        if token == 1:
            break
        out.extend(spans.get(int(token), []) if token >= lowest_sentinel else [int(token)])
    return out


# ----------------------------------------------------------------------------------------------- model features


def to_model_features(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Padded (and possibly packed) ``inputs``/``targets`` -> the features the model and the loss take.

    ``decoder_input_tokens`` are the targets shifted right with 0 (T5's start token) at the start of every packed
    segment; ``decoder_loss_weights`` is 1 on real target tokens.
    """
    targets = np.asarray(example["targets"], np.int32)
    inputs = np.asarray(example["inputs"], np.int32)
    features = {"encoder_input_tokens": inputs, "decoder_target_tokens": targets}
    shifted = np.zeros_like(targets)
    shifted[..., 1:] = targets[..., :-1]
    if "targets_positions" in example:
        positions = np.asarray(example["targets_positions"], np.int32)
        shifted = np.where(positions == 0, 0, shifted)
        features.update(
            encoder_segment_ids=np.asarray(example["inputs_segment_ids"], np.int32),
            decoder_segment_ids=np.asarray(example["targets_segment_ids"], np.int32),
            encoder_positions=np.asarray(example["inputs_positions"], np.int32),
            decoder_positions=positions,
        )
    features["decoder_input_tokens"] = shifted
    features["decoder_loss_weights"] = (targets > 0).astype(np.float32)
    return features


def pad_to(tokens: np.ndarray, length: int) -> np.ndarray:
    """Right-pad with 0 (padding id) to ``length``."""
    out = np.zeros(length, np.int32)
    out[: len(tokens)] = tokens
    return out


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Fraction of non-padding positions of each token feature in a batch."""
    return {
        key: float(np.mean(np.asarray(batch[key]) > 0))
        for key in ("encoder_input_tokens", "decoder_target_tokens")
        if key in batch
    }
