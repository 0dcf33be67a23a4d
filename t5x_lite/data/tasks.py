"""Task and Mixture registry: where a task's examples come from, how they become tokens, and how it is scored.

Adding a task is one call::

    TaskRegistry.add(
        "my_enfr",
        splits={"train": ("text_files", "train"), "validation": ("text_files", "dev")},
        source_options={"source_path": "train.en", "target_path": "train.fr"},
        prefix="translate English to French: ",
        metrics=("bleu",),
    )
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from t5x_lite.data import preprocessors

TARGET_FORMATS = ("text", "moses_lc_tok")
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech", "ro": "Romanian"}


@dataclasses.dataclass(frozen=True)
class Task:
    """One dataset turned into (inputs, targets) token sequences.

    ``splits`` maps a role (``train``, ``validation``, ``test`` or any other name) to ``(source, split)`` of
    ``sources.get_source``; ``objective`` is ``seq2seq`` (inputs -> targets) or ``span_corruption`` (T5's
    denoising of the inputs text, targets ignored).
    """

    name: str
    splits: Mapping[str, tuple[str, str]]
    source_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    split_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    prefix: str = ""
    objective: str = "seq2seq"
    metrics: tuple[str, ...] = ("bleu",)
    lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"inputs": 128, "targets": 128})
    vocab_size: int = 8000  # SentencePiece pieces trained on the train split (plus extra_ids sentinels)
    vocab_path: str | None = None  # a SentencePiece model to use instead of training one
    vocab_training_examples: int = 200_000
    vocab_model_type: str = "unigram"  # SentencePiece model type of a trained vocabulary (T5: unigram)
    extra_ids: int = 100  # sentinel ids after the pieces (T5's 100; span corruption needs them, translation not)
    target_format: str = "text"  # "text", or "moses_lc_tok": targets are lowercased Moses-tokenized text
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    postprocess: Callable[[str], str] = str.strip
    description: str = ""

    def __post_init__(self) -> None:
        if self.target_format not in TARGET_FORMATS:
            raise ValueError(
                f"Task {self.name!r}: target_format={self.target_format!r} is unknown; use one of {TARGET_FORMATS}"
            )
        if self.objective not in ("seq2seq", "span_corruption"):
            raise ValueError(
                f"Task {self.name!r}: objective={self.objective!r} is unknown; use seq2seq or span_corruption"
            )
        if "train" not in self.splits:
            raise ValueError(f"Task {self.name!r}: splits must name a 'train' split, got {sorted(self.splits)}")
        if self.objective == "span_corruption":  # the targets length follows from the inputs length
            _, targets = preprocessors.span_corruption_lengths(
                self.lengths["inputs"], self.noise_density, self.mean_noise_span_length
            )
            object.__setattr__(self, "lengths", {"inputs": self.lengths["inputs"], "targets": targets})

    def replace_lengths(self, length: int) -> Task:
        """The same task with every feature length set to ``length`` (to measure untrimmed lengths)."""
        return dataclasses.replace(self, lengths={"inputs": length, "targets": length})

    def split_names(self) -> list[str]:
        return list(self.splits)

    def get_source(self, split: str, *, data_dir: str | None = None, tfds_data_dir: str | None = None):
        """The random-access source of ``split`` (a role such as ``train`` or ``test``)."""
        from t5x_lite.data import sources

        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; it has {', '.join(self.splits)}")
        source_name, source_split = self.splits[split]
        options = {**self.source_options, **self.split_options.get(split, {})}
        return sources.get_source(source_name, source_split, data_dir=data_dir, tfds_data_dir=tfds_data_dir, **options)

    def training_texts(self, *, data_dir: str | None = None, tfds_data_dir: str | None = None) -> Iterator[str]:
        """Text a vocabulary is trained on: inputs and targets of the first examples of the train split."""
        source = self.get_source("train", data_dir=data_dir, tfds_data_dir=tfds_data_dir)
        for index in range(min(len(source), self.vocab_training_examples)):
            record = source[index]
            yield record["inputs"]
            if self.objective == "seq2seq" and record.get("targets"):
                yield record["targets"]

    def tokenize(
        self,
        record: Mapping[str, Any],
        vocab,
        *,
        rng: np.random.Generator | None = None,
        counter: preprocessors.TruncationCounter | None = None,
        on_overflow: str = "truncate",
    ) -> dict[str, Any]:
        """One record -> ``{'inputs', 'targets'}`` int32 token arrays ending in EOS, trimmed to ``lengths``."""
        if counter is not None:
            counter.seen += 1
        example_id = record.get("id")
        if self.objective == "span_corruption":
            tokens = np.asarray(vocab.encode(record["inputs"]), np.int32)
            raw_length, _ = preprocessors.span_corruption_lengths(
                self.lengths["inputs"], self.noise_density, self.mean_noise_span_length
            )
            rng = rng if rng is not None else np.random.default_rng(0 if example_id is None else example_id)
            if len(tokens) > raw_length:  # a random chunk of long documents, as T5 does
                start = int(rng.integers(0, len(tokens) - raw_length + 1))
                tokens = tokens[start : start + raw_length]
            out = preprocessors.span_corruption(
                tokens, vocab.vocab_size, rng, self.noise_density, self.mean_noise_span_length, vocab.eos_id
            )
        else:
            text = preprocessors.add_prefix(record["inputs"], self.prefix)
            out = {
                "inputs": preprocessors.append_eos(vocab.encode(text), vocab.eos_id),
                "targets": preprocessors.append_eos(vocab.encode(record.get("targets", "")), vocab.eos_id),
            }
        for feature in ("inputs", "targets"):
            out[feature] = preprocessors.trim(
                out[feature],
                self.lengths[feature],
                feature=feature,
                example_id=example_id,
                counter=counter,
                on_overflow=on_overflow,
            )
        return out


Rate = float | Callable[..., float]  # a number, or a function of (task, data_dir=, tfds_data_dir=) such as rate_by_size


def rate_by_size(task: Task, *, data_dir: str | None = None, tfds_data_dir: str | None = None) -> float:
    """A mixing rate proportional to the characters of the task's train split (its inputs and targets)."""
    source = task.get_source("train", data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    return float(sum(len(record["inputs"]) + len(record.get("targets", "")) for record in source))


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Several tasks sampled by rate (they must share a vocabulary): ``{'task_a': 1.0, 'task_b': rate_by_size}``."""

    name: str
    rates: Mapping[str, Rate]

    def tasks(self) -> list[Task]:
        return [TaskRegistry.get(name) for name in self.rates]

    def weights(self, *, data_dir: str | None = None, tfds_data_dir: str | None = None) -> list[float]:
        """Each task's rate as a number, normalized to sum to 1 (functions such as rate_by_size evaluated here)."""
        values = []
        for name, rate in self.rates.items():
            value = (
                float(rate(TaskRegistry.get(name), data_dir=data_dir, tfds_data_dir=tfds_data_dir))
                if callable(rate)
                else float(rate)
            )
            if not value > 0:
                raise ValueError(f"mixture {self.name!r}: the rate of {name!r} is {value}; it must be positive")
            values.append(value)
        total = sum(values)
        return [value / total for value in values]


class TaskRegistry:
    """Global name -> Task / Mixture table."""

    _tasks: dict[str, Task | Mixture] = {}

    @classmethod
    def add(cls, name: str, **task_fields: Any) -> Task:
        if name in cls._tasks:
            raise ValueError(f"task {name!r} is already registered; pick another name or TaskRegistry.remove it")
        task = Task(name=name, **task_fields)
        cls._tasks[name] = task
        return task

    @classmethod
    def add_mixture(cls, name: str, rates: Mapping[str, Rate]) -> Mixture:
        for task_name, rate in rates.items():
            cls.get(task_name)
            if not callable(rate) and rate <= 0:
                raise ValueError(f"mixture {name!r}: rate of {task_name!r} must be positive, got {rate}")
        mixture = Mixture(name=name, rates=dict(rates))
        cls._tasks[name] = mixture
        return mixture

    @classmethod
    def remove(cls, name: str) -> None:
        cls._tasks.pop(name, None)

    @classmethod
    def get(cls, name: str) -> Task | Mixture:
        if name.startswith("distilled:") and name not in cls._tasks:  # sequence-level distillation data
            from t5x_lite.distill_data import distilled_task

            return distilled_task(name)
        if name not in cls._tasks:
            known = ", ".join(sorted(cls._tasks))
            raise ValueError(f"unknown task {name!r}; registered tasks: {known}")
        return cls._tasks[name]

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._tasks)


def get_task(name: str) -> Task | Mixture:
    return TaskRegistry.get(name)


DEFAULT_VOCAB_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "t5x_lite", "vocab")


def task_vocabulary(
    task: Task | Mixture,
    *,
    cache_dir: str | None = None,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    extra_ids: int | None = None,
    vocab_size: int | None = None,
):
    """The task's SentencePiece vocabulary: ``vocab_path`` if set, else trained on its train split (cached), with
    the task's ``extra_ids`` sentinels unless ``extra_ids`` is given, and the task's ``vocab_size`` pieces unless
    ``vocab_size`` is given (a trained vocabulary only)."""
    from t5x_lite.data.vocab import Vocabulary, train_vocabulary

    first_task = task.tasks()[0] if isinstance(task, Mixture) else task
    if extra_ids is None:
        extra_ids = first_task.extra_ids
    if vocab_size is not None and first_task.vocab_path:
        raise ValueError(
            f"vocab_size={vocab_size} sets the size of a vocabulary trained on the task's text, but task "
            f"{task.name!r} uses the fixed SentencePiece model {first_task.vocab_path}: drop vocab_size"
        )
    if first_task.vocab_path:
        return Vocabulary(first_task.vocab_path, extra_ids=extra_ids)
    parts = task.tasks() if isinstance(task, Mixture) else [task]
    return train_vocabulary(
        itertools.chain.from_iterable(t.training_texts(data_dir=data_dir, tfds_data_dir=tfds_data_dir) for t in parts),
        vocab_size=vocab_size or first_task.vocab_size,
        cache_dir=cache_dir or DEFAULT_VOCAB_CACHE,
        name=task.name,
        extra_ids=extra_ids,
        model_type=first_task.vocab_model_type,
    )


# ----------------------------------------------------------------------------------------------- built-in tasks


def _translation_prefix(src: str, tgt: str) -> str:
    return f"translate {LANGUAGE_NAMES[src]} to {LANGUAGE_NAMES[tgt]}: "


def _register_builtin_tasks() -> None:
    for src in ("en", "de", "fr", "cs"):
        for tgt in ("en", "de", "fr", "cs"):
            if src == tgt:
                continue
            TaskRegistry.add(
                f"multi30k_{src}{tgt}",
                splits={
                    "train": ("multi30k", "train"),
                    "validation": ("multi30k", "val"),
                    "test_2016_flickr": ("multi30k", "test_2016_flickr"),
                    "test_2017_flickr": ("multi30k", "test_2017_flickr"),
                },
                source_options={"src_lang": src, "tgt_lang": tgt},
                prefix=_translation_prefix(src, tgt),
                metrics=("bleu", "tok_bleu"),
                lengths={"inputs": 64, "targets": 64},
                vocab_size=8000,
                description=f"Multi30k captions {src}->{tgt} (WMT16-18 multimodal task 1, text only)",
            )
    # The published Transformer-tiny baselines' setting (Wu et al. 2021): the official lowercased, Moses-tokenized
    # files (tok/, en and de), no task prefix, a joint BPE vocabulary, no sentinels. The pairs that tok/ lacks
    # (transfer tasks of an En->De model, docs/compression.md) read the raw files lowercased, punctuation-normalized
    # and Moses-tokenized on reading, as tok/ was made ("lc_tok"). Multi30k has no Czech test_2017_flickr.
    for src, tgt, text in (("en", "de", "tok"), ("de", "en", "tok"), ("en", "fr", "lc_tok"), ("en", "cs", "lc_tok")):
        tests = ("test_2016_flickr",) + (() if tgt == "cs" else ("test_2017_flickr",))
        how = "the official lowercased tokenized files (tok/)" if text == "tok" else "raw text lowercased and tokenized"
        TaskRegistry.add(
            f"multi30k_{src}{tgt}_tok",
            splits={"train": ("multi30k", "train"), "validation": ("multi30k", "val")}
            | {split: ("multi30k", split) for split in tests},
            source_options={"src_lang": src, "tgt_lang": tgt, "text": text},
            metrics=("bleu", "tok_bleu"),
            lengths={"inputs": 64, "targets": 64},
            vocab_size=8000,
            vocab_model_type="bpe",
            extra_ids=0,
            target_format="moses_lc_tok",
            description=f"Multi30k {src}->{tgt} on {how}, no prefix",
        )
    for src, tgt in (("en", "de"), ("de", "en")):
        TaskRegistry.add(
            f"wmt14_{src}{tgt}",
            splits={
                "train": ("tfds:wmt14_translate/de-en", "train"),
                "validation": ("wmt14_en_de", "newstest2013"),
                "test": ("wmt14_en_de", "newstest2014"),
            },
            source_options={"src_lang": src, "tgt_lang": tgt},
            prefix=_translation_prefix(src, tgt),
            lengths={"inputs": 256, "targets": 256},
            vocab_size=32000,
            description="WMT14 news; train from the TFDS catalog (internet), newstest2013/2014 local",
        )
    for src, tgt in (("en", "ro"), ("ro", "en")):
        TaskRegistry.add(
            f"wmt16_{src}{tgt}",
            splits={"train": ("tfds:wmt16_translate/ro-en", "train"), "test": ("wmt16_en_ro", "newstest2016")},
            source_options={"src_lang": src, "tgt_lang": tgt},
            prefix=_translation_prefix(src, tgt),
            lengths={"inputs": 256, "targets": 256},
            vocab_size=32000,
            description="WMT16 news; train from the TFDS catalog (internet), newstest2016 local",
        )
    TaskRegistry.add(
        "iwslt14_deen",
        splits={
            "train": ("iwslt14_de_en", "valid"),
            "validation": ("iwslt14_de_en", "valid"),
            "test": ("iwslt14_de_en", "test"),
        },
        source_options={"src_lang": "de", "tgt_lang": "en"},
        prefix=_translation_prefix("de", "en"),
        metrics=("bleu", "tok_bleu"),
        lengths={"inputs": 128, "targets": 128},
        vocab_size=10000,
        description="IWSLT14 De->En TED (fairseq split); the full train set is not available offline: "
        "'train' is the validation set, for smoke runs only",
    )
    # A domain-transfer task for a Multi30k En->De tok model (captions -> TED talks, docs/compression.md): the same
    # lowercased Moses-tokenized text and no prefix; fine-tune on fairseq's valid (7,283 pairs carved from the TED
    # train talks), pick checkpoints on the 4,600-pair train sample (other lines of the same talks), test on
    # fairseq's test (6,750 pairs of other talks). Only tok_bleu: the references are tokenized lowercased text.
    TaskRegistry.add(
        "iwslt14_ende_tok",
        splits={
            "train": ("iwslt14_de_en", "valid"),
            "validation": ("iwslt14_de_en", "train_sample"),
            "test": ("iwslt14_de_en", "test"),
        },
        source_options={"src_lang": "en", "tgt_lang": "de"},
        metrics=("tok_bleu",),
        lengths={"inputs": 128, "targets": 128},
        vocab_size=8000,
        vocab_model_type="bpe",
        extra_ids=0,
        target_format="moses_lc_tok",
        description="IWSLT14 En->De TED on fairseq's tokenized lowercased text, no prefix; a small domain-transfer "
        "set (train = fairseq's valid), not the IWSLT14 benchmark",
    )
    TaskRegistry.add(
        "aeslc",
        splits={"train": ("aeslc", "train"), "validation": ("aeslc", "dev"), "test": ("aeslc", "test")},
        prefix="summarize: ",
        metrics=("rouge",),
        lengths={"inputs": 512, "targets": 32},
        vocab_size=16000,
        description="Email body -> subject line (3 references on dev/test)",
    )
    TaskRegistry.add(
        "scitldr",
        splits={"train": ("scitldr", "train"), "validation": ("scitldr", "dev"), "test": ("scitldr", "test")},
        prefix="summarize: ",
        metrics=("rouge",),
        lengths={"inputs": 512, "targets": 64},
        vocab_size=8000,
        description="Scientific abstract -> one-sentence TLDR (SciTLDR-A, multi-reference)",
    )
    TaskRegistry.add(
        "synthetic_numbers",
        splits={
            "train": ("synthetic_numbers", "train"),
            "validation": ("synthetic_numbers", "validation"),
            "test": ("synthetic_numbers", "test"),
        },
        prefix="",
        metrics=("exact_match",),  # outputs are single compound words: corpus BLEU would have no 4-grams (always 0)
        lengths={"inputs": 32, "targets": 32},
        vocab_size=256,
        vocab_training_examples=20_000,
        description="English number words -> German number words, generated from the seed (demo and fast tests)",
    )
    TaskRegistry.add(
        "c4_span_corruption",
        splits={"train": ("tfds:c4/en", "train"), "validation": ("tfds:c4/en", "validation")},
        objective="span_corruption",
        metrics=(),
        lengths={"inputs": 512},
        vocab_size=32000,
        description="T5 pre-training objective on C4 (TFDS catalog, internet); "
        "set vocab_path to the T5 SentencePiece model",
    )
    TaskRegistry.add(
        "local_span_corruption",
        splits={"train": ("multi30k", "train"), "validation": ("multi30k", "val")},
        source_options={"src_lang": "en", "tgt_lang": "de"},
        objective="span_corruption",
        metrics=(),
        lengths={"inputs": 64},
        vocab_size=8000,
        description="T5 span corruption over local monolingual text (Multi30k English captions), offline pre-training",
    )
    _register_local_pretraining()


LOCAL_PRETRAIN_LENGTH = 128  # inputs tokens of the local pre-training tasks (141 raw tokens -> 29 targets)


def _register_local_pretraining() -> None:
    """``local_pretrain``: T5 span corruption over every local monolingual text (monolingual.PARTS), one task
    per part mixed by size, sharing one vocabulary trained on all of them; ``local_pretrain_all`` is the same
    text as one task (its validation split is what the pre-training run evaluates)."""
    from t5x_lite.data import monolingual

    common = dict(
        splits={"train": ("monolingual", "train"), "validation": ("monolingual", "validation")},
        objective="span_corruption",
        metrics=(),
        lengths={"inputs": LOCAL_PRETRAIN_LENGTH},
        vocab_size=16000,
    )
    for name, part in monolingual.PARTS.items():
        TaskRegistry.add(
            f"local_pretrain_{name}",
            source_options={"part": name},
            description=f"span corruption over {part.description}",
            **common,
        )
    TaskRegistry.add(
        "local_pretrain_all",
        source_options={"part": "all"},
        description="span corruption over every local monolingual text as one task",
        **common,
    )
    TaskRegistry.add_mixture("local_pretrain", {f"local_pretrain_{name}": rate_by_size for name in monolingual.PARTS})


_register_builtin_tasks()
