"""SentencePiece vocabularies with T5's conventions: train from a corpus (cached on disk), load, encode/decode.

Ids follow T5: pad 0, eos 1, unk 2, no bos; ``extra_ids`` sentinels ``<extra_id_0>`` ... are appended after the
SentencePiece pieces in reverse order, so ``<extra_id_0>`` is the last id (T5's 32,000 pieces + 100 = 32,100 ids).
As in seqio, the sentinels are added to the model as user-defined pieces ``▁<extra_id_N>``: ``encode`` recognizes
them in text (at the start or after a space) and ``decode`` renders them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from t5x_lite import fileio

MODEL_FILENAME = "spm.model"
META_FILENAME = "vocab.json"
MODEL_TYPES = ("unigram", "bpe", "word")  # 'char' ignores vocab_size, so it is left out
# The trained model depends on the thread count (EM statistics are summed per thread), so it is fixed.
_TRAIN_THREADS = 1
_CACHE_FORMAT = 1  # bump when the training recipe changes, so that old cache files are not reused

_log = logging.getLogger(__name__)


def _check_extra_ids(extra_ids: int) -> None:
    if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"extra_ids={extra_ids!r} must be an integer >= 0 (T5 uses 100; 0 means no sentinels)")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class Vocabulary:
    """A SentencePiece model plus ``extra_ids`` sentinel ids; immutable, picklable, equal when fingerprints are."""

    pad_id = 0
    eos_id = 1
    unk_id = 2

    def __init__(self, model: bytes | str | os.PathLike, extra_ids: int = 100) -> None:
        _check_extra_ids(extra_ids)
        if isinstance(model, (bytes, bytearray, memoryview)):
            model_bytes, source = bytes(model), "the model bytes"
        elif isinstance(model, (str, os.PathLike)):
            path = fileio.workdir_path(model)
            if path.is_dir():
                raise ValueError(
                    f"vocabulary model {str(path)!r} is a directory; use Vocabulary.load({str(path)!r}) for a "
                    f"directory written by save(), or pass the path of the .model file"
                )
            if not path.is_file():
                raise FileNotFoundError(
                    f"vocabulary model {str(path)!r} does not exist; pass the path of a SentencePiece .model file "
                    f"(e.g. one written by train_vocabulary)"
                )
            model_bytes, source = path.read_bytes(), repr(str(path))
        else:
            raise TypeError(f"model must be bytes or a path, not {type(model).__name__}")

        base = spm.SentencePieceProcessor()
        try:
            base.LoadFromSerializedProto(model_bytes)
        except RuntimeError as error:
            raise ValueError(
                f"{source} is not a SentencePiece model ({_first_line(error)}); pass a .model file written by "
                f"SentencePiece, e.g. by train_vocabulary"
            ) from None
        found = (base.pad_id(), base.eos_id(), base.unk_id())
        if found != (self.pad_id, self.eos_id, self.unk_id):
            raise ValueError(
                f"{source} has (pad, eos, unk) ids {found}, but T5 conventions need (0, 1, 2); retrain it with "
                f"train_vocabulary (or SentencePiece's pad_id=0 eos_id=1 unk_id=2 bos_id=-1)"
            )

        proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
        for i in reversed(range(extra_ids)):
            proto.pieces.add(
                piece=f"▁<extra_id_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto.SerializeToString())
        except RuntimeError as error:
            raise ValueError(
                f"{source} cannot take {extra_ids} extra_ids ({_first_line(error)}); does it already contain "
                f"<extra_id_N> pieces? then pass extra_ids=0"
            ) from None
        self._model_bytes = model_bytes
        self._extra_ids = extra_ids
        self._vocab_size = self._sp.GetPieceSize()
        digest = hashlib.sha256(model_bytes)
        digest.update(f"\0extra_ids={extra_ids}".encode())
        self._fingerprint = digest.hexdigest()

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces + extra_ids: the size the model's embedding must at least have."""
        return self._vocab_size

    @property
    def extra_ids(self) -> int:
        return self._extra_ids

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model, without the sentinels (they are added at load time)."""
        return self._model_bytes

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the model bytes and extra_ids: two vocabularies tokenize alike iff fingerprints match."""
        return self._fingerprint

    def extra_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``: ``vocab_size - 1 - i``, so sentinels count down from the last id."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self._extra_ids:
            raise ValueError(f"extra_id({i!r}) is out of range: this vocabulary has extra_ids={self._extra_ids}")
        return self._vocab_size - 1 - int(i)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no EOS is appended (the preprocessors append it)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, not {type(text).__name__}; use encode_batch for a list")
        return self._sp.Encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in one call into SentencePiece (multi-threaded)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, not one str; use encode for a single text")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{i}] is {type(text).__name__}, expected str")
        return self._sp.Encode(texts, out_type=int) if texts else []

    def _clean(self, ids: Sequence[int] | np.ndarray, where: str = "") -> list[int]:
        """Ids up to the first EOS, without padding; ValueError for an id outside [0, vocab_size)."""
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids{where}, got shape {array.shape}; use decode_batch")
        if array.size == 0:
            return []
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"decode expects integer ids{where}, got dtype {array.dtype}")
        eos = np.flatnonzero(array == self.eos_id)
        if eos.size:
            array = array[: eos[0]]
        bad = np.flatnonzero((array < 0) | (array >= self._vocab_size))
        if bad.size:
            position = int(bad[0])
            raise ValueError(
                f"id {int(array[position])} at position {position}{where} is outside [0, {self._vocab_size}) of this "
                f"vocabulary; is the model's vocabulary the same (fingerprint {self._fingerprint[:12]}), or do its "
                f"padded logits need masking beyond vocab_size?"
            )
        return array[array != self.pad_id].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: stops at the first EOS, drops padding, renders sentinels as ``<extra_id_N>``.

        Only the ids before the first EOS are checked and decoded; what follows EOS is ignored.
        """
        return self._sp.Decode(self._clean(ids))

    def decode_batch(self, batch: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """``decode`` of each row of a 2-D array or a list of (possibly ragged) id lists."""
        if isinstance(batch, np.ndarray) and batch.ndim != 2:
            raise ValueError(f"decode_batch expects a 2-D array, got shape {batch.shape}; use decode for one row")
        rows = [self._clean(row, where=f" of row {i}") for i, row in enumerate(batch)]
        return self._sp.Decode(rows) if rows else []

    # ---------------------------------------------------------------- save / load
    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``spm.model`` and ``vocab.json`` (extra_ids, fingerprint) into directory; returns the model path.

        Both files are written atomically; the model file is the plain SentencePiece model, readable by any tool.
        """
        directory = fileio.workdir_path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"extra_ids": self._extra_ids, "fingerprint": self._fingerprint, "vocab_size": self._vocab_size}
        fileio.write_bytes_atomic(directory / MODEL_FILENAME, self._model_bytes)
        fileio.write_bytes_atomic(directory / META_FILENAME, (json.dumps(meta, indent=2) + "\n").encode())
        return str(directory / MODEL_FILENAME)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Vocabulary:
        """Inverse of ``save``; checks the fingerprint recorded there, so a mismatched pair of files is caught."""
        directory = fileio.workdir_path(directory)
        model_path, meta_path = directory / MODEL_FILENAME, directory / META_FILENAME
        for path in (model_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{str(path)!r} does not exist: Vocabulary.load expects a directory written by Vocabulary.save; "
                    f"for a bare .model file use Vocabulary(path, extra_ids=N)"
                )
        try:
            meta = json.loads(meta_path.read_text())
            extra_ids = meta["extra_ids"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{str(meta_path)!r} is not a vocabulary description ({_first_line(error)}); rewrite it with "
                f"Vocabulary.save"
            ) from None
        vocab = cls(model_path, extra_ids=extra_ids)
        if meta.get("fingerprint", vocab.fingerprint) != vocab.fingerprint:
            raise ValueError(
                f"{str(model_path)!r} has fingerprint {vocab.fingerprint[:12]}, but {str(meta_path)!r} records "
                f"{str(meta['fingerprint'])[:12]}: the files come from different vocabularies; save it again"
            )
        return vocab

    # ---------------------------------------------------------------- python protocol
    def __reduce__(self):
        return (type(self), (self._model_bytes, self._extra_ids))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.fingerprint == self._fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"Vocabulary(vocab_size={self._vocab_size}, extra_ids={self._extra_ids}, {self._fingerprint[:12]})"


def _train_sentencepiece(sentences: list[str], settings: dict) -> bytes:
    """One in-process SentencePiece training; its RuntimeErrors become one-line ValueErrors naming the fix."""
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            model_type=settings["model_type"],
            vocab_size=settings["vocab_size"],
            character_coverage=settings["character_coverage"],
            byte_fallback=settings["byte_fallback"],
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=settings["num_threads"],
            input_sentence_size=0,  # use every sentence given (we subsample deterministically ourselves)
            shuffle_input_sentence=False,
            minloglevel=1,  # warnings and errors only
        )
    except RuntimeError as error:
        message, vocab_size = str(error), settings["vocab_size"]
        if match := re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message):
            raise ValueError(
                f"vocab_size={vocab_size} is too large for this corpus ({len(sentences)} sentences): SentencePiece "
                f"can make at most {match.group(2)} pieces from it; pass a smaller vocab_size (<= {match.group(2)}) "
                f"or more text"
            ) from None
        if match := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
            extra = " (byte_fallback adds 256 byte pieces)" if settings["byte_fallback"] else ""
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the corpus needs {match.group(2)} pieces for its characters "
                f"and special tokens{extra}; pass a larger vocab_size or a lower character_coverage"
            ) from None
        raise ValueError(f"SentencePiece training failed with {settings}: {_first_line(error)}") from None
    return buffer.getvalue()


def _subsample(sentences: list[str], max_sentences: int) -> list[str]:
    """At most ``max_sentences`` sentences, evenly spaced through the corpus (deterministic, not just the head)."""
    n = len(sentences)
    if n <= max_sentences:
        return sentences
    return [sentences[i * n // max_sentences] for i in range(max_sentences)]


def train_vocabulary(
    texts: Iterable[str],
    *,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    name: str = "spm",
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    extra_ids: int = 100,
    max_sentences: int = 1_000_000,
) -> Vocabulary:
    """Trains a SentencePiece model on ``texts`` (``vocab_size`` pieces, + ``extra_ids`` sentinels), cached on disk.

    The cache file ``cache_dir/{name}-{key[:16]}.model`` is keyed by a sha256 of every text and every training
    setting (extra_ids is not one: sentinels are added at load time), so the same corpus and settings train once.
    Training is deterministic: one thread, no sampling, and corpora over ``max_sentences`` non-empty texts are
    subsampled at evenly spaced positions.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; use one of {MODEL_TYPES} (T5 uses 'unigram')")
    _check_extra_ids(extra_ids)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer (T5 uses 32000)")
    if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences!r} must be a positive integer")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(
            f"character_coverage={character_coverage!r} must be in (0, 1]; use 1.0 for small alphabets, 0.9995 for CJK"
        )
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"name={name!r} must be a plain file-name prefix without path separators, e.g. 'spm'")
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings (one sentence or document each), not a single string")

    settings = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "character_coverage": float(character_coverage),
        "byte_fallback": bool(byte_fallback),
        "max_sentences": max_sentences,
        "num_threads": _TRAIN_THREADS,
        "format": _CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    sentences: list[str] = []
    count = 0
    for count, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise TypeError(f"texts[{count - 1}] is {type(text).__name__}, expected str")
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        if text.strip():
            sentences.append(text)
    if not sentences:
        raise ValueError(
            f"empty corpus: none of the {count} texts given has a non-whitespace character; pass the training text "
            f"(an iterable of sentences or documents)"
        )
    key = digest.hexdigest()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{key[:16]}.model"
    if path.is_file():
        try:
            return Vocabulary(path, extra_ids=extra_ids)
        except ValueError as error:
            _log.warning("cached vocabulary %s is unreadable (%s); training it again", path, error)

    model_bytes = _train_sentencepiece(_subsample(sentences, max_sentences), settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_bytes_atomic(path, model_bytes)
    _log.info("trained a %s vocabulary of %d pieces on %d texts: %s", model_type, vocab_size, len(sentences), path)
    return Vocabulary(model_bytes, extra_ids=extra_ids)
