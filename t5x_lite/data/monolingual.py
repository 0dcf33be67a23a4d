"""Monolingual text of the local corpora, cut into passages for span-corruption pre-training.

Every text of ``../shared/data`` that no registered task evaluates on goes in (``PARTS``); every text that one does
(Multi30k val/test, AESLC and SciTLDR dev/test, IWSLT14 valid/test, the WMT newstest sets) stays out, so a model
pre-trained here and fine-tuned on those tasks never saw their evaluation text. Long documents (emails, abstracts,
talks) are cut into passages of at most ``max_chars`` characters at sentence ends (at spaces inside a longer
sentence), short ones (captions) are passages as they are. Every 100th passage (by a hash of its text) is held
out as the ``validation`` split.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

from t5x_lite.data.paths import data_root

DEFAULT_MAX_CHARS = 400  # about 100 SentencePiece tokens: a passage fits the 141 raw tokens of a 128-token input
HELD_OUT_EVERY = 100  # one passage in 100 -> validation
SPLITS = ("train", "validation")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_IWSLT16_UNUSED = ("TED.tst2013", "TED.tst2014", "TEDX.tst2013", "TEDX.tst2014")  # not in the IWSLT14 test set


@dataclasses.dataclass(frozen=True)
class Part:
    """One body of text: ``documents(data_dir, tfds_data_dir)`` yields documents, each a list of text units."""

    name: str
    description: str
    documents: Callable[[str | None, str | None], Iterator[list[str]]]


def _multi30k(lang: str) -> Callable[[str | None, str | None], Iterator[list[str]]]:
    def documents(data_dir, tfds_data_dir):
        from t5x_lite.data.sources import get_source

        other = "de" if lang == "en" else "en"
        source = get_source(
            "multi30k", "train", data_dir=data_dir, tfds_data_dir=tfds_data_dir, src_lang=lang, tgt_lang=other
        )
        for record in source:
            yield [record["inputs"]]  # a caption is a document of one sentence

    return documents


def _summarization_inputs(corpus: str) -> Callable[[str | None, str | None], Iterator[list[str]]]:
    def documents(data_dir, tfds_data_dir):
        from t5x_lite.data.sources import get_source

        for record in get_source(corpus, "train", data_dir=data_dir, tfds_data_dir=tfds_data_dir):
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", record["inputs"])]
            yield [p for p in paragraphs if p]

    return documents


def _iwslt16_talks(lang: str) -> Callable[[str | None, str | None], Iterator[list[str]]]:
    def documents(data_dir, tfds_data_dir):
        from t5x_lite.data.sources import read_lines

        folder = data_root(data_dir) / "iwslt14_de_en" / "raw_iwslt16"
        for name in _IWSLT16_UNUSED:
            yield [line.strip() for line in read_lines(folder / f"IWSLT16.{name}.de-en.{lang}.gz") if line.strip()]

    return documents


def _iwslt14_train_sample(lang: str) -> Callable[[str | None, str | None], Iterator[list[str]]]:
    def documents(data_dir, tfds_data_dir):
        from t5x_lite.data.sources import get_source

        source = get_source(
            "iwslt14_de_en",
            "train_sample",
            data_dir=data_dir,
            tfds_data_dir=tfds_data_dir,
            src_lang=lang,
            tgt_lang="en" if lang == "de" else "de",
        )
        for record in source:
            yield [record["inputs"]]

    return documents


PARTS: dict[str, Part] = {
    **{
        f"multi30k_{lang}": Part(f"multi30k_{lang}", f"Multi30k train captions, {lang} (29,000)", _multi30k(lang))
        for lang in ("en", "de", "fr", "cs")
    },
    "aeslc_bodies": Part("aeslc_bodies", "AESLC train email bodies (14,436)", _summarization_inputs("aeslc")),
    "scitldr_abstracts": Part(
        "scitldr_abstracts", "SciTLDR-A train abstracts (1,992)", _summarization_inputs("scitldr")
    ),
    **{
        f"iwslt16_talks_{lang}": Part(
            f"iwslt16_talks_{lang}",
            f"IWSLT16 TED/TEDx tst2013-2014 talks, {lang} (not in the IWSLT14 test set)",
            _iwslt16_talks(lang),
        )
        for lang in ("de", "en")
    },
    **{
        f"iwslt14_train_sample_{lang}": Part(
            f"iwslt14_train_sample_{lang}",
            f"IWSLT14 4,600-sentence train sample, {lang} (lowercased, tokenized)",
            _iwslt14_train_sample(lang),
        )
        for lang in ("de", "en")
    },
}


def split_passages(units: Sequence[str], max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """``units`` (paragraphs or lines of one document) -> passages of at most ``max_chars`` characters.

    Consecutive sentences are joined with one space while they fit; a sentence longer than ``max_chars`` is cut
    at spaces (a word longer than that, at ``max_chars``). Joining the passages with spaces gives back the
    document's words in order: nothing is dropped.
    """
    if max_chars < 16:
        raise ValueError(f"max_chars={max_chars} is too small for a passage; use at least 16")
    pieces: list[str] = []
    for unit in units:
        for sentence in _SENTENCE_END.split(" ".join(unit.split())):
            if len(sentence) <= max_chars:
                pieces.append(sentence)
                continue
            line = ""
            for word in sentence.split(" "):
                while len(word) > max_chars:
                    if line:
                        pieces.append(line)
                        line = ""
                    pieces.append(word[:max_chars])
                    word = word[max_chars:]
                if line and len(line) + 1 + len(word) > max_chars:
                    pieces.append(line)
                    line = ""
                line = f"{line} {word}" if line else word
            if line:
                pieces.append(line)
    passages: list[str] = []
    for piece in (p for p in pieces if p):
        if passages and len(passages[-1]) + 1 + len(piece) <= max_chars:
            passages[-1] = f"{passages[-1]} {piece}"
        else:
            passages.append(piece)
    return passages


def held_out(passage: str) -> bool:
    """Whether ``passage`` belongs to the validation split: a fixed hash of its text, never of its position."""
    return zlib.crc32(passage.encode("utf-8")) % HELD_OUT_EVERY == 0


def passages(
    part: str,
    split: str,
    *,
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[str]:
    """The passages of ``part`` (a name of ``PARTS``, or ``all``) in ``split`` (train or validation), in order."""
    if split not in SPLITS:
        raise ValueError(f"monolingual text has splits {', '.join(SPLITS)}, not {split!r}")
    names = list(PARTS) if part == "all" else [part]
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        raise ValueError(f"unknown monolingual part {unknown[0]!r}; choose one of all, {', '.join(PARTS)}")
    root = str(data_root(data_dir))
    return [text for name in names for text in _part_passages(name, split, root, tfds_data_dir, max_chars)]


@functools.lru_cache(maxsize=32)
def _part_passages(name: str, split: str, data_dir: str, tfds_data_dir: str | None, max_chars: int) -> tuple[str, ...]:
    out = []
    for document in PARTS[name].documents(data_dir, tfds_data_dir):
        out += [p for p in split_passages(document, max_chars) if held_out(p) == (split == "validation")]
    return tuple(out)
