"""Tests of t5x_lite.data.vocab: tiny SentencePiece models trained on synthetic text (a second or two in all)."""

from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from t5x_lite import fileio
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.data.vocab import Vocabulary, train_vocabulary

SYLLABLES = ("ka", "ro", "mi", "tu", "ße", "ä", "ö", "ü", "en", "er", "sch", "st", "ra", "li", "no", "ve", "ga", "he")
PIECES = 300
EXTRA_IDS = 100


def make_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """German-looking sentences over a fixed alphabet with umlauts and ß."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += ["Straße", "schön", "grün", "Mädchen", "über"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def vocab(corpus, tmp_path_factory) -> Vocabulary:
    cache = tmp_path_factory.mktemp("vocab_cache")
    return train_vocabulary(corpus, vocab_size=PIECES, cache_dir=cache, byte_fallback=True, extra_ids=EXTRA_IDS)


# ---------------------------------------------------------------- ids and sentinels
def test_special_ids_follow_t5(vocab):
    base = spm.SentencePieceProcessor(model_proto=vocab.model_bytes)
    assert (Vocabulary.pad_id, Vocabulary.eos_id, Vocabulary.unk_id) == (0, 1, 2)
    assert [base.IdToPiece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert base.bos_id() == -1
    assert base.GetPieceSize() == PIECES
    assert vocab.vocab_size == PIECES + EXTRA_IDS and vocab.extra_ids == EXTRA_IDS


def test_unknown_character_is_unk_without_byte_fallback(corpus, tmp_path):
    plain = train_vocabulary(corpus, vocab_size=200, cache_dir=tmp_path, extra_ids=0)
    assert plain.vocab_size == 200
    assert plain.unk_id in plain.encode("ka 日")


def test_extra_ids_count_down_from_the_last_id(vocab):
    assert vocab.extra_id(0) == vocab.vocab_size - 1
    assert vocab.extra_id(EXTRA_IDS - 1) == vocab.vocab_size - EXTRA_IDS == PIECES
    for bad in (-1, EXTRA_IDS):
        with pytest.raises(ValueError, match=f"extra_id\\({bad}\\).*extra_ids={EXTRA_IDS}"):
            vocab.extra_id(bad)


def test_decode_renders_sentinels_and_encode_recognizes_them(vocab):
    ka = vocab.encode("ka")
    ids = [vocab.extra_id(0), *ka, vocab.extra_id(1), *ka, vocab.extra_id(99)]
    assert vocab.decode(ids) == "<extra_id_0> ka <extra_id_1> ka <extra_id_99>"
    assert vocab.encode("<extra_id_0> ka <extra_id_1> ka <extra_id_99>") == ids


# ---------------------------------------------------------------- encode / decode
def test_round_trip_unicode(vocab, corpus):
    texts = corpus[:50] + ["Das Mädchen läuft über die grüne Straße.", "Größe: 5 € — naïve café, 日本語 ✓"]
    for text in texts:
        ids = vocab.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert vocab.eos_id not in ids and vocab.pad_id not in ids, "encode must not append EOS"
        assert vocab.decode(ids) == text
    unseen = vocab.encode("日")  # not in the corpus: byte_fallback spells it in 3 UTF-8 byte pieces
    assert len(unseen) >= 3 and vocab.unk_id not in unseen


def test_batch_encode_decode_match_single(vocab, corpus):
    texts = corpus[:20]
    batch = vocab.encode_batch(texts)
    assert batch == [vocab.encode(t) for t in texts]
    assert vocab.encode_batch([]) == [] and vocab.decode_batch([]) == []
    width = max(len(ids) for ids in batch) + 3
    array = np.zeros((len(batch), width), np.int32)
    for row, ids in enumerate(batch):
        array[row, : len(ids)] = ids
        array[row, len(ids)] = vocab.eos_id
    assert vocab.decode_batch(array) == texts
    assert vocab.decode_batch([ids + [vocab.eos_id] for ids in batch]) == texts  # ragged list of lists


def test_decode_stops_at_eos_and_drops_padding(vocab):
    a, b = vocab.encode("ka"), vocab.encode("ro")
    assert vocab.decode([0, *a, 0, 0, *b, vocab.eos_id, *a, 0]) == "ka ro"
    assert vocab.decode(np.array([*a, vocab.eos_id, 10**6])) == "ka", "ids after EOS are ignored"
    assert vocab.decode([vocab.eos_id, *a]) == ""
    assert vocab.decode([0, 0, 0]) == "" and vocab.decode([]) == ""
    rows = [[*a, vocab.eos_id, *b], [0, *b, 0, 0]]
    width = max(map(len, rows))
    assert vocab.decode_batch(np.array([row + [0] * (width - len(row)) for row in rows])) == ["ka", "ro"]


# ---------------------------------------------------------------- save / load / pickle
def test_save_load_round_trip(vocab, corpus, tmp_path):
    path = vocab.save(tmp_path / "vocab")
    assert path == str(tmp_path / "vocab" / "spm.model") and os.path.isfile(path)
    loaded = Vocabulary.load(tmp_path / "vocab")
    assert loaded.fingerprint == vocab.fingerprint and loaded == vocab
    assert loaded.model_bytes == vocab.model_bytes
    assert (loaded.vocab_size, loaded.extra_ids) == (vocab.vocab_size, vocab.extra_ids)
    assert loaded.encode_batch(corpus[:30]) == vocab.encode_batch(corpus[:30])
    assert Vocabulary(path, extra_ids=EXTRA_IDS) == vocab
    assert Vocabulary(path, extra_ids=5) != vocab, "extra_ids are part of the fingerprint"
    unpickled = pickle.loads(pickle.dumps(vocab))
    assert unpickled == vocab and unpickled.encode(corpus[0]) == vocab.encode(corpus[0])


def test_load_errors(vocab, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*Vocabulary.save"):
        Vocabulary.load(tmp_path / "missing")
    vocab.save(tmp_path / "v")
    (tmp_path / "v" / "spm.model").write_bytes(vocab.model_bytes[:1000])  # a truncated model
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Vocabulary.load(tmp_path / "v")
    Vocabulary(vocab.model_bytes, extra_ids=3).save(tmp_path / "v")
    (tmp_path / "v" / "vocab.json").write_text('{"extra_ids": 3, "fingerprint": "0123456789abcdef"}')
    with pytest.raises(ValueError, match="different vocabularies"):
        Vocabulary.load(tmp_path / "v")


# ---------------------------------------------------------------- caching and determinism
def test_second_call_loads_the_cache_without_training(corpus, tmp_path, monkeypatch):
    calls = []
    real_train = spm.SentencePieceTrainer.train
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    first = train_vocabulary(corpus, vocab_size=200, cache_dir=tmp_path, name="de")
    assert len(calls) == 1
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].startswith("de-") and files[0].endswith(".model")
    assert len(files[0]) == len("de-") + 16 + len(".model")

    second = train_vocabulary(iter(corpus), vocab_size=200, cache_dir=tmp_path, name="de")  # a generator works too
    assert len(calls) == 1, "the cached model must be loaded, not retrained"
    assert second == first
    other_extra = train_vocabulary(corpus, vocab_size=200, cache_dir=tmp_path, name="de", extra_ids=7)
    assert len(calls) == 1 and other_extra.model_bytes == first.model_bytes and other_extra.vocab_size == 207

    train_vocabulary(corpus, vocab_size=201, cache_dir=tmp_path, name="de")  # other settings: trained again
    train_vocabulary(corpus[:-1], vocab_size=200, cache_dir=tmp_path, name="de")  # other text: trained again
    assert len(calls) == 3 and len(os.listdir(tmp_path)) == 3

    (tmp_path / files[0]).write_bytes(b"garbage")  # an unreadable cache file is replaced, not trusted
    assert train_vocabulary(corpus, vocab_size=200, cache_dir=tmp_path, name="de") == first
    assert len(calls) == 4 and (tmp_path / files[0]).read_bytes() == first.model_bytes


def test_training_is_deterministic(corpus, tmp_path):
    for model_type in ("unigram", "bpe"):
        a = train_vocabulary(corpus, vocab_size=250, cache_dir=tmp_path / "a", model_type=model_type)
        b = train_vocabulary(list(corpus), vocab_size=250, cache_dir=tmp_path / "b", model_type=model_type)
        assert a.model_bytes == b.model_bytes and a.fingerprint == b.fingerprint
        assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b")


def test_max_sentences_subsamples_deterministically(corpus, tmp_path):
    a = train_vocabulary(corpus, vocab_size=150, cache_dir=tmp_path / "a", max_sentences=500)
    b = train_vocabulary(corpus, vocab_size=150, cache_dir=tmp_path / "b", max_sentences=500)
    full = train_vocabulary(corpus, vocab_size=150, cache_dir=tmp_path / "a")
    assert a.model_bytes == b.model_bytes != full.model_bytes
    assert vocab_lib._subsample(list("abcdefghij"), 4) == list("acfh")


def test_word_model_type(corpus, tmp_path):
    word = train_vocabulary(corpus, vocab_size=200, cache_dir=tmp_path, model_type="word", extra_ids=2)
    assert word.vocab_size == 202 and word.decode(word.encode(corpus[0])).startswith(corpus[0].split()[0])


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(fileio.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        fileio.write_bytes_atomic(tmp_path / "x.model", b"half")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("texts", [[], ["", "   ", "\n"]])
def test_empty_corpus(texts, tmp_path):
    with pytest.raises(ValueError, match=f"empty corpus: none of the {len(texts)} texts"):
        train_vocabulary(texts, vocab_size=100, cache_dir=tmp_path)


def test_vocab_size_too_large_or_small(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=50000 is too large .* smaller vocab_size \(<= \d+\)"):
        train_vocabulary(corpus, vocab_size=50_000, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size=10 is too small.*larger vocab_size"):
        train_vocabulary(corpus, vocab_size=10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*byte_fallback adds 256"):
        train_vocabulary(corpus, vocab_size=100, cache_dir=tmp_path, byte_fallback=True)
    assert os.listdir(tmp_path) == [], "failed trainings write nothing"


def test_bad_settings(corpus, tmp_path):
    with pytest.raises(ValueError, match="model_type='wordpiece' is not supported; use one of"):
        train_vocabulary(corpus, vocab_size=100, cache_dir=tmp_path, model_type="wordpiece")
    with pytest.raises(ValueError, match="extra_ids=-1 must be an integer >= 0"):
        train_vocabulary(corpus, vocab_size=100, cache_dir=tmp_path, extra_ids=-1)
    with pytest.raises(ValueError, match="vocab_size=0 must be a positive integer"):
        train_vocabulary(corpus, vocab_size=0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="not a single string"):
        train_vocabulary("one long string", vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        train_vocabulary(["ok", b"bytes"], vocab_size=100, cache_dir=tmp_path)


def test_bad_models(vocab, tmp_path):
    with pytest.raises(ValueError, match="extra_ids=-1 must be an integer >= 0"):
        Vocabulary(vocab.model_bytes, extra_ids=-1)
    with pytest.raises(FileNotFoundError, match="nope.model' does not exist"):
        Vocabulary(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="junk.model' is not a SentencePiece model"):
        Vocabulary(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="is a directory; use Vocabulary.load"):
        Vocabulary(tmp_path)
    # SentencePiece's own defaults (unk 0, bos 1, eos 2) are not T5's.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus(500)), model_writer=buffer, vocab_size=100, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"\(pad, eos, unk\) ids \(-1, 2, 0\).*\(0, 1, 2\)"):
        Vocabulary(buffer.getvalue())


def test_decode_out_of_range(vocab):
    with pytest.raises(ValueError, match=f"id {vocab.vocab_size} at position 1 is outside \\[0, {vocab.vocab_size}\\)"):
        vocab.decode([5, vocab.vocab_size, vocab.eos_id])
    with pytest.raises(ValueError, match="id -3 at position 0"):
        vocab.decode(np.array([-3, 5]))
    with pytest.raises(ValueError, match="id 999 at position 2 of row 1"):
        vocab.decode_batch(np.array([[5, 6, 7], [5, 6, 999]]))
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode([[5, 6]])
