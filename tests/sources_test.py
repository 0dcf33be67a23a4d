"""Sources: the real corpora through TFDS (sizes, original order, no re-preparation), files, synthetic, errors."""

from __future__ import annotations

import gzip
import json
import pickle
import random

import numpy as np
import pytest

from t5x_lite.data import sources
from t5x_lite.data.sources import get_source


def raw_lines(path) -> list[str]:
    """The file's lines, read independently of the code under test."""
    with open(path, "rb") as f:
        data = f.read()
    lines = (gzip.decompress(data) if str(path).endswith(".gz") else data).decode("utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One TFDS data dir for the real corpora of this module: each is prepared once (a few seconds)."""
    return str(tmp_path_factory.mktemp("tfds"))


def check_order(source, inputs: list[str], targets: list[str], samples: int = 25) -> None:
    """Record i is line i: ids and contents at 0, the end and random positions (catches a shuffled order)."""
    assert len(source) == len(inputs) == len(targets)
    for i in [0, len(source) - 1, *random.Random(0).sample(range(len(source)), samples)]:
        record = source[i]
        assert record["id"] == i
        assert (record["inputs"], record["targets"]) == (inputs[i], targets[i])
        assert record["references"][0] == record["targets"]


# ---------------------------------------------------------------------------------------------------- real corpora


def test_multi30k(shared_data, tfds_dir):
    root = shared_data / "multi30k"
    sizes = {}
    for split in sources.SPLITS["multi30k"]:
        source = get_source("multi30k", split, tfds_data_dir=tfds_dir)
        sizes[split] = len(source)
        if split in ("train", "test_2016_flickr"):
            en, de = raw_lines(root / f"raw/{split}.en.gz"), raw_lines(root / f"raw/{split}.de.gz")
            check_order(source, en, de)
            tok = raw_lines(root / f"tok/{split}.lc.norm.tok.de.gz")
            assert [source[i]["tok_references"] for i in (0, 7)] == [[tok[0]], [tok[7]]]
    assert sizes == {"train": 29_000, "val": 1_014, "test_2016_flickr": 1_000, "test_2017_flickr": 1_000}
    assert get_source("multi30k", "train", tfds_data_dir=tfds_dir)[0]["inputs"].startswith("Two young, White males")

    fr_cs = get_source("multi30k", "val", tfds_data_dir=tfds_dir, src_lang="fr", tgt_lang="cs")
    assert (fr_cs[3]["inputs"], fr_cs[3]["targets"]) == (
        raw_lines(root / "raw/val.fr.gz")[3],
        raw_lines(root / "raw/val.cs.gz")[3],
    )
    assert "tok_references" not in fr_cs[3]  # tok/ has en and de only
    with pytest.raises(ValueError, match=r"test_2017_flickr.*no 'cs'.*en, de, fr.*'cs' exists for train, val"):
        get_source("multi30k", "test_2017_flickr", tfds_data_dir=tfds_dir, src_lang="en", tgt_lang="cs")
    with pytest.raises(ValueError, match="not a pair of two of en, de, fr, cs"):
        get_source("multi30k", "val", tfds_data_dir=tfds_dir, src_lang="en", tgt_lang="en")

    # The official lowercased tokenized files as inputs and targets; sacreBLEU's references stay the raw text.
    tok = get_source("multi30k", "test_2016_flickr", tfds_data_dir=tfds_dir, text="tok")
    tok_en = raw_lines(root / "tok/test_2016_flickr.lc.norm.tok.en.gz")
    tok_de = raw_lines(root / "tok/test_2016_flickr.lc.norm.tok.de.gz")
    record = tok[5]
    assert (record["inputs"], record["targets"], record["tok_references"]) == (tok_en[5], tok_de[5], [tok_de[5]])
    assert record["references"] == [raw_lines(root / "raw/test_2016_flickr.de.gz")[5]]
    with pytest.raises(ValueError, match="no tokenized 'fr' text"):
        get_source("multi30k", "val", tfds_data_dir=tfds_dir, src_lang="fr", tgt_lang="de", text="tok")
    with pytest.raises(ValueError, match="text='bpe' is unknown"):
        get_source("multi30k", "val", tfds_data_dir=tfds_dir, text="bpe")


def test_wmt(shared_data, tfds_dir):
    en, de = (raw_lines(shared_data / f"wmt14_en_de/newstest2014.{lang}") for lang in ("en", "de"))
    source = get_source("wmt14_en_de", "newstest2014", tfds_data_dir=tfds_dir)
    check_order(source, en, de)
    assert source._getitems([5, 0, 3_002]) == [source[5], source[0], source[-1]]  # grain's batched read
    check_order(get_source("wmt14_en_de", "newstest2014", tfds_data_dir=tfds_dir, src_lang="de", tgt_lang="en"), de, en)
    assert len(en) == 3_003 and len(get_source("wmt14_en_de", "newstest2013", tfds_data_dir=tfds_dir)) == 3_000
    en, ro = (raw_lines(shared_data / f"wmt16_en_ro/newstest2016.{lang}") for lang in ("en", "ro"))
    assert len(en) == 1_999
    check_order(get_source("wmt16_en_ro", "newstest2016", tfds_data_dir=tfds_dir), en, ro)
    check_order(get_source("wmt16_en_ro", "newstest2016", tfds_data_dir=tfds_dir, src_lang="ro", tgt_lang="en"), ro, en)


def test_iwslt14(shared_data, tfds_dir):
    root = shared_data / "iwslt14_de_en"
    for split, size in (("valid", 7_283), ("test", 6_750)):
        de, en = raw_lines(root / f"fairseq_tok/{split}.de.gz"), raw_lines(root / f"fairseq_tok/{split}.en.gz")
        assert len(de) == size
        source = get_source("iwslt14_de_en", split, tfds_data_dir=tfds_dir)
        check_order(source, de, en)
        assert source[5]["tok_references"] == [en[5]]
    sample = get_source("iwslt14_de_en", "train_sample", tfds_data_dir=tfds_dir)
    bpe = raw_lines(root / "sample_train_bpe10k/train.en.gz")
    assert len(sample) == 4_600 and "@@" in bpe[0]
    assert (
        sample[0]["targets"]
        == bpe[0].replace("@@ ", "")
        == "we grew up playing — mom &apos;s from cape breton , coincidentally ."
    )
    assert not any("@@" in sample[i]["inputs"] + sample[i]["targets"] for i in range(0, 4_600, 97))


def test_aeslc(shared_data, tfds_dir):
    sizes = {split: len(get_source("aeslc", split, tfds_data_dir=tfds_dir)) for split in sources.SPLITS["aeslc"]}
    assert sizes == {"train": 14_436, "dev": 1_960, "test": 1_906}
    dev = get_source("aeslc", "dev", tfds_data_dir=tfds_dir)
    first = dev[0]  # enron_subject_line/dev/allen-p_inbox_29.subject, the first dev file of the (sorted) tar
    assert first["id"] == 0 and first["inputs"].startswith("Hi Phillip,  This message is to confirm our meeting")
    assert first["references"] == ["meeting confimation - tues, 8/10", "meeting confirmation", "meeting confirmed"]
    assert first["targets"] == first["references"][0]
    assert all(len(dev[i]["references"]) == 3 and dev[i]["id"] == i for i in range(0, 1_960, 61))
    train = get_source("aeslc", "train", tfds_data_dir=tfds_dir)
    assert all(len(train[i]["references"]) == 1 and train[i]["targets"] for i in range(0, 14_436, 701))


def test_scitldr(shared_data, tfds_dir):
    sizes, counts = {}, {}
    for split in sources.SPLITS["scitldr"]:
        source = get_source("scitldr", split, tfds_data_dir=tfds_dir)
        with gzip.open(shared_data / f"scitldr/SciTLDR-A/{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        sizes[split], counts[split] = len(source), sum(len(source[i]["references"]) for i in range(len(source)))
        for i in (0, 17, len(rows) - 1):
            assert source[i]["id"] == i and source[i]["inputs"] == " ".join(rows[i]["source"])
            assert source[i]["references"] == rows[i]["target"] and source[i]["targets"] == rows[i]["target"][0]
        assert counts[split] == sum(len(row["target"]) for row in rows)
    assert sizes == {"train": 1_992, "dev": 619, "test": 618}
    assert counts["train"] == 1_992 and counts["test"] > 618  # multi-reference on dev/test


def test_second_open_does_not_prepare_again(shared_data, tmp_path, monkeypatch):
    calls = []
    generate = sources.Wmt16EnRoBuilder._split_generators
    monkeypatch.setattr(
        sources.Wmt16EnRoBuilder, "_split_generators", lambda self, dl: calls.append(1) or generate(self, dl)
    )
    first = get_source("wmt16_en_ro", "newstest2016", tfds_data_dir=str(tmp_path))
    info = next(tmp_path.glob("t5x_lite_wmt16_en_ro/*/dataset_info.json"))
    mtime = info.stat().st_mtime_ns
    second = get_source("wmt16_en_ro", "newstest2016", tfds_data_dir=str(tmp_path), data_dir=str(tmp_path / "gone"))
    assert calls == [1] and info.stat().st_mtime_ns == mtime
    assert first[42] == second[42]
    again = pickle.loads(pickle.dumps(second))  # grain workers receive a pickled source
    assert again[42] == second[42] and len(again) == 1_999 and "wmt16_en_ro" in repr(again)


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'}.*T5X_LITE_DATA.*data_dir"):
        get_source("wmt16_en_ro", "newstest2016", data_dir=str(tmp_path / "nowhere"), tfds_data_dir=str(tmp_path))
    (tmp_path / "data").mkdir()  # the root exists, the corpus folder does not
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'data' / 'wmt16_en_ro'} not found.*T5X_LITE_DATA"):
        get_source("wmt16_en_ro", "newstest2016", data_dir=str(tmp_path / "data"), tfds_data_dir=str(tmp_path))


def test_local_corpus_with_mismatched_files(tmp_path):
    corpus = tmp_path / "data" / "wmt16_en_ro"
    corpus.mkdir(parents=True)
    (corpus / "newstest2016.en").write_text("one\ntwo\nthree\n")
    (corpus / "newstest2016.ro").write_text("unu\ndoi\n")
    with pytest.raises(ValueError, match=r"newstest2016.en has 3 lines, .*newstest2016.ro has 2 lines"):
        get_source("wmt16_en_ro", "newstest2016", data_dir=str(tmp_path / "data"), tfds_data_dir=str(tmp_path / "t"))


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown source 'multi31k'; known sources: aeslc, .*multi30k.*tfds:"):
        get_source("multi31k", "train")
    with pytest.raises(ValueError, match=r"no split 'validation'; known splits: train, val, test_2016_flickr"):
        get_source("multi30k", "validation")
    with pytest.raises(ValueError, match=r"unknown option\(s\) sede; allowed: seed"):
        get_source("synthetic_numbers", "train", sede=1)


def test_tfds_catalog_offline_gives_one_clear_error(tmp_path):
    for name in ("tfds:xsum", "tfds:wmt14_translate/de-en"):
        with pytest.raises(RuntimeError) as error:
            get_source(name, "validation", tfds_data_dir=str(tmp_path))
        message = str(error.value)
        assert "\n" not in message and "could not be downloaded/prepared" in message
        assert "internet" in message and "'.[tf]'" in message and "TFDS_DATA_DIR" in message
        assert error.value.__cause__ is None and error.value.__suppress_context__


def test_tfds_catalog_feature_names():
    fields = sources._catalog_fields
    assert fields("cnn_dailymail:3.4.0", ["article", "highlights", "id"], {}) == sources._Fields(
        "article", "highlights"
    )
    assert fields("xsum", ["document", "summary", "id"], {}) == sources._Fields("document", "summary")
    assert fields("wmt14_translate/de-en", ["de", "en"], {}) == sources._Fields("en", "de")
    assert fields("wmt16_translate/ro-en", ["en", "ro"], {"src_lang": "ro", "tgt_lang": "en"}) == sources._Fields(
        "ro", "en"
    )
    c4 = fields("c4/en", ["text", "timestamp", "url"], {})
    record = sources._make_record(3, {"text": b"Some web text.", "url": b"u"}, c4)
    assert record == {"id": 3, "inputs": "Some web text.", "targets": "", "references": [""]}
    with pytest.raises(ValueError, match="pass input_key= and target_key=, features are a, b, c"):
        fields("glue/cola", ["a", "b", "c"], {})


# ---------------------------------------------------------------------------------------------------- files


def test_text_files(tmp_path):
    src, tgt = tmp_path / "train.en", tmp_path / "train.de.gz"
    src.write_text("Hello world\nGood night\u2028still one line\n", encoding="utf-8")
    tgt.write_bytes(gzip.compress("Hallo Welt\r\nGute Nacht, schöne Grüße".encode()))
    source = get_source("text_files", "anything", source_path=str(src), target_path=str(tgt))
    assert len(source) == 2 and source.split == "anything"
    assert source[1] == {
        "id": 1,
        "inputs": "Good night\u2028still one line",
        "targets": "Gute Nacht, schöne Grüße",
        "references": ["Gute Nacht, schöne Grüße"],
    }
    assert source[-2]["targets"] == "Hallo Welt"
    source[0]["references"].append("mutated")
    assert source[0]["references"] == ["Hallo Welt"]
    with pytest.raises(IndexError):
        source[2]


def test_text_files_bad_input(tmp_path):
    good, short, empty, bad = (tmp_path / name for name in ("good.txt", "short.txt", "empty.txt", "bad.txt"))
    good.write_text("a\nb\nc\n")
    short.write_text("x\ny\n")
    empty.write_text("")
    bad.write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(ValueError, match=rf"{good} has 3 lines, {short} has 2 lines"):
        get_source("text_files", "train", source_path=str(good), target_path=str(short))
    with pytest.raises(ValueError, match=rf"{empty}: the file is empty"):
        get_source("text_files", "train", source_path=str(good), target_path=str(empty))
    with pytest.raises(ValueError, match=rf"{bad}: invalid UTF-8 on line 3 "):
        get_source("text_files", "train", source_path=str(bad), target_path=str(good))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'missing.txt'}: no such file"):
        get_source("text_files", "train", source_path=str(tmp_path / "missing.txt"), target_path=str(good))


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"doc": ["First sentence.", "Second."], "tldr": "Short."}, {"doc": "Plain.", "tldr": ["A", "B"]}]
    rows.append({"doc": "Three.", "tldr": "x", "references": ["x", "y"]})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    source = get_source("jsonl", "dev", path=str(path), input_key="doc", target_key="tldr")
    assert [source[i] for i in range(3)] == [
        {"id": 0, "inputs": "First sentence. Second.", "targets": "Short.", "references": ["Short."]},
        {"id": 1, "inputs": "Plain.", "targets": "A", "references": ["A", "B"]},
        {"id": 2, "inputs": "Three.", "targets": "x", "references": ["x", "y"]},
    ]
    path.write_text('{"doc": "a", "tldr": "b"}\n{"doc": "a", tldr: b}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not valid JSON"):
        get_source("jsonl", "dev", path=str(path), input_key="doc", target_key="tldr")
    path.write_text('{"doc": "a", "tldr": "b"}\n\n{"doc": "a", "summary": "b"}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 3 has no key 'tldr' \(keys: doc, summary\)"):
        get_source("jsonl", "dev", path=str(path), input_key="doc", target_key="tldr")


# ---------------------------------------------------------------------------------------------------- synthetic

GERMAN = {
    0: "null",
    1: "eins",
    7: "sieben",
    16: "sechzehn",
    17: "siebzehn",
    21: "einundzwanzig",
    30: "dreißig",
    67: "siebenundsechzig",
    100: "hundert",
    101: "hunderteins",
    111: "hundertelf",
    201: "zweihunderteins",
    999: "neunhundertneunundneunzig",
    1_000: "tausend",
    1_001: "tausendeins",
    1_100: "tausendeinhundert",
    2_021: "zweitausendeinundzwanzig",
    21_000: "einundzwanzigtausend",
    100_000: "hunderttausend",
    101_000: "hunderteintausend",
    999_999: "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
    1_000_000: "eine Million",
    1_000_001: "eine Million eins",
    1_001_000: "eine Million eintausend",
    2_000_000: "zwei Millionen",
    21_500_000: "einundzwanzig Millionen fünfhunderttausend",
}


@pytest.mark.parametrize("number", list(GERMAN))
def test_german_number_words(number):
    assert sources.german_number(number) == GERMAN[number]


def test_english_number_words():
    english = sources.english_number
    assert english(0) == "zero" and english(15) == "fifteen" and english(40) == "forty"
    assert english(121) == "one hundred twenty-one"
    assert english(121, british=True, hyphen=False) == "one hundred and twenty one"
    assert english(1_001, british=True) == "one thousand and one"
    assert english(2_000_017) == "two million seventeen"


def test_synthetic_numbers_deterministic_and_seeded():
    source = get_source("synthetic_numbers", "train")
    assert len(source) == 2**31 - 1 and len(get_source("synthetic_numbers", "test")) == 1_000
    indices = [0, 1, 2, 12_345, 2**31 - 2]
    records = [source[i] for i in indices]
    assert records == [get_source("synthetic_numbers", "train", seed=0)[i] for i in indices]
    assert [r["id"] for r in records] == indices
    other = get_source("synthetic_numbers", "train", seed=1)
    assert [other[i] for i in indices] != records
    clean = get_source("synthetic_numbers", "train", noise=0.0)
    for i in range(200):
        number, _ = clean.number(i)
        assert clean[i]["inputs"] == sources.english_number(number)
        assert clean[i]["targets"] == sources.german_number(number) == clean[i]["references"][0]
    inputs = [source[i]["inputs"] for i in range(300)]
    assert any(text[0].isdigit() for text in inputs) and any(text[0].isalpha() for text in inputs)


def test_synthetic_numbers_splits_are_disjoint():
    numbers = {}
    for split in sources.SPLITS["synthetic_numbers"]:
        source = get_source("synthetic_numbers", split, seed=3)
        numbers[split] = {source.number(i)[0] for i in range(600)}
        assert set(sources.number_split(np.array(sorted(numbers[split])))) == {split}
    assert not numbers["train"] & numbers["validation"]
    assert not numbers["train"] & numbers["test"]
    assert not numbers["validation"] & numbers["test"]
    assert len(numbers["validation"]) > 450 and min(numbers["test"]) >= 1_000  # few repeats; small numbers: train
    owner = sources.number_split(np.arange(1_000_000))
    assert set(owner[:1_000]) == {"train"}
    assert 0.019 < np.mean(owner[1_000:] == "validation") < 0.021 and 0.019 < np.mean(owner[1_000:] == "test") < 0.021


def test_sources_work_with_grain():
    import grain

    source = get_source("synthetic_numbers", "validation", num_examples=10)
    dataset = grain.MapDataset.source(source).shuffle(seed=0)
    assert sorted(record["id"] for record in dataset) == list(range(10))
    assert "synthetic_numbers" in repr(source) and "len=10" in repr(source)
