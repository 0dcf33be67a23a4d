"""Length-bucketed batches under a token budget (fairseq's ``--max-tokens``), for seq2seq training without padding.

Every example goes to the smallest bucket whose padded length holds it (the longer of its inputs and targets); a
batch of bucket ``L`` has ``rows(L) = batch_tokens // L`` rows (rounded down to a multiple of ``row_multiple``), so
every batch holds about ``batch_tokens`` padded tokens, and a row wastes at most the gap to its bucket's length.
Each bucket is one batch shape, i.e. one compilation of the train step.

One epoch, from (seed, epoch) alone: permute the examples; cut each bucket, in that order, into batches of its
rows; the few left over of a bucket join the next (longer) bucket, and those left at the longest one make one
last batch filled up with empty rows; shuffle the batches. Every example appears exactly once per epoch, the
number of batches per epoch never changes, and batch ``i`` of the run is a pure function of (seed, i), so an
iterator restored at ``i`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence

import grain
import numpy as np

# Padded lengths: every 4 tokens up to 32, every 8 up to 64, every 16 up to 128, then every 32.
_DEFAULT_STEPS = ((32, 4), (64, 8), (128, 16), (sys.maxsize, 32))


def default_boundaries(max_length: int, min_length: int = 8) -> tuple[int, ...]:
    """Bucket lengths from ``min_length`` to ``max_length`` (always the last), finer where sentences are common."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be a positive number of tokens")
    lengths, length = [], min_length
    while length < max_length:
        lengths.append(length)
        length += next(step for limit, step in _DEFAULT_STEPS if length < limit)
    return (*lengths, max_length)


class TokenizedExamples:
    """A tokenized split held in memory, one int32 array and offsets per feature (fairseq's binarized data):
    tokenized once, then batches are cut from memory instead of re-tokenizing every example every epoch."""

    def __init__(self, tokens: Mapping[str, np.ndarray], offsets: Mapping[str, np.ndarray]):
        self._tokens, self._offsets = dict(tokens), dict(offsets)
        sizes = {len(offset) - 1 for offset in self._offsets.values()}
        if len(sizes) != 1:
            raise ValueError(f"features have different numbers of examples: {sizes}")
        self._size = sizes.pop()

    @classmethod
    def collect(cls, examples: Sequence[Mapping[str, np.ndarray]], features: Sequence[str] = ("inputs", "targets")):
        """Read every example of ``examples`` (a random-access dataset of token dicts) once."""
        arrays: dict[str, list[np.ndarray]] = {key: [] for key in features}
        for index in range(len(examples)):
            example = examples[index]
            for key in features:
                arrays[key].append(np.asarray(example[key], np.int32))
        offsets = {key: np.concatenate([[0], np.cumsum([len(a) for a in values])]) for key, values in arrays.items()}
        tokens = {key: np.concatenate(values) if values else np.zeros(0, np.int32) for key, values in arrays.items()}
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {
            key: tokens[self._offsets[key][index] : self._offsets[key][index + 1]]
            for key, tokens in self._tokens.items()
        }

    def lengths(self) -> np.ndarray:
        """The longer of the features of every example, in tokens."""
        return np.max(np.stack([np.diff(offsets) for offsets in self._offsets.values()]), axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class BucketPlan:
    """Which examples form which batch, epoch by epoch, given every example's length (and the examples)."""

    lengths: np.ndarray  # [num_examples] the longer of inputs and targets, in tokens (EOS included)
    boundaries: tuple[int, ...]  # padded length of each bucket, ascending
    rows: tuple[int, ...]  # rows of a batch of each bucket
    seed: int
    examples: TokenizedExamples | None = None  # the tokenized split the lengths were measured on

    @classmethod
    def build(
        cls,
        lengths: Sequence[int] | np.ndarray,
        *,
        batch_tokens: int,
        boundaries: Sequence[int],
        row_multiple: int = 8,
        seed: int = 0,
        examples: TokenizedExamples | None = None,
    ) -> BucketPlan:
        lengths = np.asarray(lengths, np.int64)
        boundaries = tuple(int(b) for b in boundaries)
        if not boundaries or list(boundaries) != sorted(set(boundaries)) or boundaries[0] < 1:
            raise ValueError(f"bucket boundaries {boundaries} must be distinct positive lengths in increasing order")
        if len(lengths) == 0:
            raise ValueError("no examples to batch: the split is empty")
        if lengths.max() > boundaries[-1]:
            raise ValueError(
                f"an example has {int(lengths.max())} tokens, more than the longest bucket ({boundaries[-1]}); "
                "add a longer boundary or trim examples to the task's lengths"
            )
        if row_multiple < 1:
            raise ValueError(f"row_multiple={row_multiple} must be a positive integer")
        rows = tuple((batch_tokens // length) // row_multiple * row_multiple for length in boundaries)
        if rows[-1] < row_multiple:
            raise ValueError(
                f"batch_tokens={batch_tokens} holds fewer than {row_multiple} rows of the longest bucket "
                f"({boundaries[-1]} tokens); use batch_tokens >= {row_multiple * boundaries[-1]} "
                "or a shorter task length"
            )
        return cls(lengths=lengths, boundaries=boundaries, rows=rows, seed=int(seed), examples=examples)

    @functools.cached_property
    def bucket_of_example(self) -> np.ndarray:
        return np.searchsorted(np.asarray(self.boundaries), self.lengths, side="left")

    @functools.cached_property
    def batches_per_epoch(self) -> int:
        counts = np.bincount(self.bucket_of_example, minlength=len(self.boundaries))
        total, carried = 0, 0
        for count, rows in zip(counts, self.rows, strict=True):
            full, carried = divmod(int(count) + carried, rows)
            total += full
        return total + (1 if carried else 0)

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The batches of ``epoch`` in training order: ``(bucket, example indices)``; -1 marks an empty row."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        buckets = self.bucket_of_example[order]
        batches: list[tuple[int, np.ndarray]] = []
        carried = np.zeros(0, np.int64)
        for bucket, rows in enumerate(self.rows):
            members = np.concatenate([carried, order[buckets == bucket]])
            full = len(members) // rows
            batches += [(bucket, members[i * rows : (i + 1) * rows]) for i in range(full)]
            carried = members[full * rows :]
        if len(carried):
            last = len(self.rows) - 1
            batches.append((last, np.concatenate([carried, np.full(self.rows[last] - len(carried), -1)])))
        assert len(batches) == self.batches_per_epoch
        return [batches[i] for i in rng.permutation(len(batches))]

    def padding_fraction(self, epoch: int = 0) -> float:
        """Fraction of the padded token positions (the longer side of each row) that hold no token."""
        padded = real = 0
        for bucket, indices in self.epoch(epoch):
            padded += self.rows[bucket] * self.boundaries[bucket]
            real += int(self.lengths[indices[indices >= 0]].sum())
        return 1.0 - real / padded

    def shapes(self) -> list[tuple[int, int]]:
        """(rows, length) of every bucket that some batch uses."""
        used = sorted({bucket for bucket, _ in self.epoch(0)})
        return [(self.rows[b], self.boundaries[b]) for b in used]


class BucketedBatches(grain.MapDataset):
    """Batch ``i`` of the run (epochs follow each other): this process's rows of it, padded per feature to its
    bucket's length (never beyond the feature's own maximum), as ``{'inputs', 'targets'}`` [rows, length] arrays."""

    def __init__(
        self,
        plan: BucketPlan,
        max_lengths: Mapping[str, int],
        *,
        shard_index: int = 0,
        shard_count: int = 1,
        num_epochs: int | None = None,
    ):
        super().__init__()
        if plan.examples is None:
            raise ValueError("BucketedBatches needs a plan built with its examples (BucketPlan.build(examples=...))")
        for rows in plan.rows:
            if rows % shard_count:
                raise ValueError(f"a bucket of {rows} rows does not split over {shard_count} processes")
        self._plan = plan
        self._max_lengths = {key: int(value) for key, value in max_lengths.items()}
        self._shard_index, self._shard_count = shard_index, shard_count
        self._num_epochs = num_epochs
        self._cached_epoch: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize
        return self._plan.batches_per_epoch * self._num_epochs

    def _batches_of_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, self._plan.epoch(epoch))
        return self._cached_epoch[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self._plan.batches_per_epoch)
        bucket, indices = self._batches_of_epoch(epoch)[position]
        local = len(indices) // self._shard_count
        indices = indices[self._shard_index * local : (self._shard_index + 1) * local]
        length = self._plan.boundaries[bucket]
        out = {key: np.zeros((local, min(length, limit)), np.int32) for key, limit in self._max_lengths.items()}
        for row, example_index in enumerate(indices):
            if example_index < 0:
                continue  # an empty row filling the epoch's last batch: all padding, weight 0
            example = self._plan.examples[int(example_index)]
            for key, array in out.items():
                tokens = example[key]
                array[row, : len(tokens)] = tokens
        return out

    def __str__(self) -> str:
        return f"BucketedBatches({len(self._plan.boundaries)} buckets, {self._plan.batches_per_epoch} per epoch)"
