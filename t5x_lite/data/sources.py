"""Where examples come from: `get_source(name, split)` returns a random-access source of plain dicts.

Local corpora (../shared/data) are TFDS builders written as array_record once and read back without TensorFlow;
the TFDS catalog, plain text / JSONL files and a synthetic number-translation task share the same record shape
(``id``, ``inputs``, ``targets``, ``references``, optional ``tok_references``) so that tasks never care which it is.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import operator
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from t5x_lite.data.paths import ENV_VAR, data_root
from t5x_lite.data.synthetic import english_number, german_number, number_split

SPLITS: dict[str, tuple[str, ...]] = {
    "multi30k": ("train", "val", "test_2016_flickr", "test_2017_flickr"),
    "wmt14_en_de": ("newstest2013", "newstest2014"),
    "wmt16_en_ro": ("newstest2016",),
    "iwslt14_de_en": ("valid", "test", "train_sample"),
    "aeslc": ("train", "dev", "test"),
    "scitldr": ("train", "dev", "test"),
    "synthetic_numbers": ("train", "validation", "test"),
}
_FILE_SOURCES = ("text_files", "jsonl")  # any split name: it only labels the source
_MONOLINGUAL = "monolingual"  # passages of the local corpora for pre-training (monolingual.py): train, validation


def list_sources() -> list[str]:
    """Names accepted by `get_source`, besides ``tfds:<catalog name>``."""
    return sorted([*SPLITS, *_FILE_SOURCES, _MONOLINGUAL])


# ---------------------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class _Fields:
    """Which stored features become inputs / targets / references / tok_references."""

    inputs: str
    targets: str | None = None  # a text feature ...
    references: str | None = None  # ... or a list feature whose first item is the target
    tok_references: str | None = None
    targets_empty: bool = False  # c4-style: inputs only
    reference_text: str | None = None  # a text feature scored as the reference when the targets are another form
    # (source, target) languages: inputs and targets are raw text, lowercased, punctuation-normalized and
    # Moses-tokenized on reading, as Multi30k's tok/ files were made (for the languages tok/ lacks)
    moses_languages: tuple[str, str] | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _make_record(index: int, raw: dict[str, Any], fields: _Fields) -> dict[str, Any]:
    if fields.references:
        references = [_text(item) for item in raw[fields.references]]
    else:
        references = [""] if fields.targets_empty else [_text(raw[fields.targets])]
    record = {"id": index, "inputs": _text(raw[fields.inputs]), "targets": references[0], "references": references}
    if fields.moses_languages:
        src, tgt = fields.moses_languages
        record["inputs"], record["targets"] = _lc_tok(record["inputs"], src), _lc_tok(references[0], tgt)
        record["tok_references"] = [record["targets"]]
        return record
    if fields.reference_text:  # e.g. trained on tokenized text, scored by sacreBLEU against the raw text
        record["references"] = [_text(raw[fields.reference_text])]
    if fields.tok_references:
        record["tok_references"] = [_text(raw[fields.tok_references])]
    return record


@functools.lru_cache(maxsize=1 << 17)
def _lc_tok(text: str, lang: str) -> str:
    """Multi30k's tok/ preprocessing of one line (cached: sacremoses costs ~0.1 ms a line, and epochs repeat)."""
    from t5x_lite.metrics import moses_tokenize

    return moses_tokenize(text, lang)


class Source:
    """A grain RandomAccessDataSource of record dicts; `source[i]['id'] == i`."""

    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def _record(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, n = operator.index(index), len(self)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self!r}")
        return self._record(i)

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read; grain uses it when present (TFDS sources read all records at once)."""
        return [self[i] for i in indices]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def _describe(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = "".join(f", {part}" for part in [self._describe()] if part)
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}{extra}, len={len(self)})"


class ListSource(Source):
    """Records held in memory (text files, JSONL)."""

    def __init__(self, name: str, split: str, records: list[dict[str, Any]], description: str = ""):
        self.name, self.split, self._records, self._description = name, split, records, description

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, index: int) -> dict[str, Any]:
        record = dict(self._records[index])
        for key in ("references", "tok_references"):
            if key in record:
                record[key] = list(record[key])
        return record

    def _describe(self) -> str:
        return self._description


# ---------------------------------------------------------------------------------------------------- files


def _open_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def decode_utf8(data: bytes, path: Path | str) -> str:
    """The text of ``data``; invalid UTF-8 raises ValueError naming the file and the 1-based line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}: invalid UTF-8 on line {line} (byte {error.start}): {error.reason}") from None


def read_lines(path: str | Path) -> list[str]:
    """Lines of a text file (``.gz`` allowed) without line ends; a missing or empty file raises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = decode_utf8(_open_bytes(path), path)
    lines = text.split("\n")  # not splitlines(): U+2028, U+0085 ... inside a sentence must not split it
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel(*paths: str | Path) -> list[list[str]]:
    """Line-aligned files; different line counts raise ValueError naming both files and both counts."""
    columns = [read_lines(path) for path in paths]
    for path, column in zip(paths[1:], columns[1:], strict=True):
        if len(column) != len(columns[0]):
            raise ValueError(
                f"parallel files differ in length: {paths[0]} has {len(columns[0])} lines, "
                f"{path} has {len(column)} lines"
            )
    return columns


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        yield number, value


def _join(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _jsonl_source(
    split: str, path: str, input_key: str = "inputs", target_key: str = "targets", references_key: str = "references"
) -> ListSource:
    """One record per JSON line; list values of the input are joined by spaces, a list target is multi-reference."""
    records = []
    for number, value in _read_jsonl(Path(path)):
        for key in (input_key, target_key):
            if key not in value:
                raise ValueError(f"{path}: line {number} has no key {key!r} (keys: {', '.join(sorted(value))})")
        target = value[target_key]
        references = value.get(references_key, target if isinstance(target, list) else [target])
        references = [str(item) for item in (references if isinstance(references, list) else [references])]
        if isinstance(target, list):
            target = target[0] if target else ""
        references = references or [str(target)]
        records.append(
            {"id": len(records), "inputs": _join(value[input_key]), "targets": str(target), "references": references}
        )
    return ListSource("jsonl", split, records, f"path={path!r}")


def _text_files_source(split: str, source_path: str, target_path: str) -> ListSource:
    inputs, targets = read_parallel(source_path, target_path)
    pairs = enumerate(zip(inputs, targets, strict=True))
    records = [{"id": i, "inputs": x, "targets": y, "references": [y]} for i, (x, y) in pairs]
    return ListSource("text_files", split, records, f"source_path={source_path!r}, target_path={target_path!r}")


@functools.lru_cache(maxsize=64)
def _monolingual_source(split: str, part: str, max_chars: int, data_dir: str | None, tfds_data_dir: str | None):
    from t5x_lite.data import monolingual

    texts = monolingual.passages(part, split, data_dir=data_dir, tfds_data_dir=tfds_data_dir, max_chars=max_chars)
    if not texts:
        raise ValueError(f"monolingual part {part!r} has no {split} passages")
    records = [{"id": i, "inputs": text, "targets": "", "references": [""]} for i, text in enumerate(texts)]
    return ListSource(_MONOLINGUAL, split, records, f"part={part!r}, max_chars={max_chars}")


# ---------------------------------------------------------------------------------------------------- TFDS builders


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A local corpus: reads ``manual_dir`` (= data_root()/FOLDER), stores every field plus ``id``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"The shared corpora folder (../shared/data, ${ENV_VAR} or the data_dir option)."
    SOURCE = FOLDER = ""
    TEXT: tuple[str, ...] = ()
    LISTS: tuple[str, ...] = ()
    # No URLs, so no checksums file to find; looking for it makes TFDS 4.9 import the absent importlib_resources.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": tfds.features.Scalar(np.int64)}
        features |= {name: tfds.features.Text() for name in self.TEXT}
        features |= {name: tfds.features.Sequence(tfds.features.Text()) for name in self.LISTS}
        # DatasetInfo(builder=self) directly: dataset_info_from_configs needs a package folder with metadata files.
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict()
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in self._splits(root)}

    def _splits(self, root: Path) -> list[str]:
        return list(SPLITS[self.SOURCE])

    def _generate_examples(self, root: Path, split: str):
        for i, example in enumerate(self._examples(root, split)):
            yield i, {"id": i, **example}

    def _examples(self, root: Path, split: str) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


def _rows(columns: dict[str, list[str]]) -> Iterator[dict[str, str]]:
    names = list(columns)
    for values in zip(*columns.values(), strict=True):
        yield dict(zip(names, values, strict=True))


class Multi30kBuilder(_CorpusBuilder, skip_registration=True):
    name = "t5x_lite_multi30k"
    SOURCE = FOLDER = "multi30k"
    LANGUAGES = ("en", "de", "fr", "cs")
    TEXT = (*LANGUAGES, *(f"tok_{lang}" for lang in LANGUAGES))

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        languages, toks = (
            {},
            {},
        )  # what exists per split (test_2017_flickr has no cs; tok/ has en, de): kept as metadata
        for split in SPLITS["multi30k"]:
            languages[split] = [lang for lang in self.LANGUAGES if (root / f"raw/{split}.{lang}.gz").is_file()]
            toks[split] = [lang for lang in self.LANGUAGES if (root / f"tok/{split}.lc.norm.tok.{lang}.gz").is_file()]
        self.info.metadata.update(languages=languages, tok_languages=toks)
        return {split: self._generate_examples(root, split) for split, langs in languages.items() if langs}

    def _examples(self, root: Path, split: str):
        meta = self.info.metadata
        paths = {lang: root / f"raw/{split}.{lang}.gz" for lang in meta["languages"][split]}
        paths |= {f"tok_{lang}": root / f"tok/{split}.lc.norm.tok.{lang}.gz" for lang in meta["tok_languages"][split]}
        columns = dict(zip(paths, read_parallel(*paths.values()), strict=True))
        n = len(next(iter(columns.values())))
        columns |= {name: [""] * n for name in self.TEXT if name not in columns}  # absent language: empty strings
        return _rows(columns)


class _PairBuilder(_CorpusBuilder, skip_registration=True):
    """Two line-aligned plain files per split: FOLDER/<split>.<lang>."""

    def _examples(self, root: Path, split: str):
        columns = read_parallel(*(root / f"{split}.{lang}" for lang in self.TEXT))
        return _rows(dict(zip(self.TEXT, columns, strict=True)))


class Wmt14EnDeBuilder(_PairBuilder, skip_registration=True):
    name = "t5x_lite_wmt14_en_de"
    SOURCE = FOLDER = "wmt14_en_de"
    TEXT = ("en", "de")


class Wmt16EnRoBuilder(_PairBuilder, skip_registration=True):
    name = "t5x_lite_wmt16_en_ro"
    SOURCE = FOLDER = "wmt16_en_ro"
    TEXT = ("en", "ro")


class Iwslt14DeEnBuilder(_CorpusBuilder, skip_registration=True):
    """fairseq's tokenized, lowercased valid/test; ``train_sample`` is the 4,600-pair BPE sample with BPE undone."""

    name = "t5x_lite_iwslt14_de_en"
    SOURCE = FOLDER = "iwslt14_de_en"
    TEXT = ("de", "en")

    def _splits(self, root: Path) -> list[str]:
        sample = all((root / "sample_train_bpe10k" / f"train.{lang}.gz").is_file() for lang in self.TEXT)
        return ["valid", "test", *(["train_sample"] if sample else [])]

    def _examples(self, root: Path, split: str):
        if split == "train_sample":
            columns = read_parallel(*(root / "sample_train_bpe10k" / f"train.{lang}.gz" for lang in self.TEXT))
            columns = [[(line + " ").replace("@@ ", "").rstrip() for line in column] for column in columns]
        else:
            columns = read_parallel(*(root / "fairseq_tok" / f"{split}.{lang}.gz" for lang in self.TEXT))
        return _rows(dict(zip(self.TEXT, columns, strict=True)))


class AeslcBuilder(_CorpusBuilder, skip_registration=True):
    """Email body -> subject; dev/test keep the 3 annotations (``@ann0..2``) as references, train its ``@subject``."""

    name = "t5x_lite_aeslc"
    SOURCE = FOLDER = "aeslc"
    TEXT = ("body", "subject", "file")
    LISTS = ("references",)

    def _split_generators(self, dl_manager):
        self._tar = Path(dl_manager.manual_dir) / "enron_subject_line.tar.gz"
        self._files = {split: [] for split in SPLITS["aeslc"]}
        with tarfile.open(self._tar) as tar:  # read once, in process: nothing is extracted
            for member in tar:
                folder = member.name.split("/")[-2:-1]
                if member.isfile() and folder and folder[0] in self._files:
                    self._files[folder[0]].append((member.name, tar.extractfile(member).read()))
        return super()._split_generators(dl_manager)

    def _examples(self, root: Path, split: str):
        for file, data in self._files[split]:
            where = f"{self._tar}:{file}"
            sections = _aeslc_sections(decode_utf8(data, where), where)
            annotations = [sections[key] for key in ("@ann0", "@ann1", "@ann2") if key in sections]
            references = annotations or [sections["@subject"]]
            yield {"body": sections[""], "subject": sections["@subject"], "file": file, "references": references}


def _aeslc_sections(text: str, where: str) -> dict[str, str]:
    sections, key = {"": []}, ""
    for line in text.split("\n"):
        if line in ("@subject", "@ann0", "@ann1", "@ann2"):
            key = line
            sections[key] = []
        else:
            sections[key].append(line)
    if "@subject" not in sections:
        raise ValueError(f"{where}: no '@subject' line")
    return {key: "\n".join(lines).strip() for key, lines in sections.items()}


class SciTldrBuilder(_CorpusBuilder, skip_registration=True):
    """SciTLDR-A: the abstract's sentences joined by spaces -> TLDRs (1 on train, several on dev/test)."""

    name = "t5x_lite_scitldr"
    SOURCE = FOLDER = "scitldr"
    TEXT = ("source", "paper_id", "title")
    LISTS = ("references",)

    def _examples(self, root: Path, split: str):
        path = root / "SciTLDR-A" / f"{split}.jsonl.gz"
        for number, value in _read_jsonl(path):
            if not value.get("target") or "source" not in value:
                raise ValueError(f"{path}: line {number} lacks 'source' or a non-empty 'target'")
            references = [str(target) for target in value["target"]]
            paper, title = str(value.get("paper_id", "")), str(value.get("title", ""))
            yield {"source": " ".join(value["source"]), "paper_id": paper, "title": title, "references": references}


_BUILDERS: dict[str, type[_CorpusBuilder]] = {
    cls.SOURCE: cls
    for cls in (Multi30kBuilder, Wmt14EnDeBuilder, Wmt16EnRoBuilder, Iwslt14DeEnBuilder, AeslcBuilder, SciTldrBuilder)
}


def _pair(name: str, languages: tuple[str, ...], default: tuple[str, str], src_lang: str | None, tgt_lang: str | None):
    src, tgt = src_lang or default[0], tgt_lang or default[1]
    if src == tgt or src not in languages or tgt not in languages:
        raise ValueError(f"{name}: src_lang={src!r}, tgt_lang={tgt!r} is not a pair of two of {', '.join(languages)}")
    return src, tgt


def _local_fields(name: str, split: str, metadata: dict, options: dict) -> _Fields:
    """Map a local corpus's stored features to record fields, given the options."""
    if name in ("aeslc", "scitldr"):
        _check_options(name, options, ())
        return _Fields(inputs="body" if name == "aeslc" else "source", references="references")
    _check_options(name, options, ("src_lang", "tgt_lang", "text") if name == "multi30k" else ("src_lang", "tgt_lang"))
    builder = _BUILDERS[name]
    if name == "multi30k":
        src, tgt = _pair(name, builder.LANGUAGES, ("en", "de"), options.get("src_lang"), options.get("tgt_lang"))
        have = metadata["languages"][split]
        for lang in (src, tgt):
            if lang not in have:
                where = [s for s, langs in metadata["languages"].items() if lang in langs]
                raise ValueError(
                    f"multi30k split {split!r} has no {lang!r} text (it has {', '.join(have)}); "
                    f"{lang!r} exists for {', '.join(where)}"
                )
        tok = f"tok_{tgt}" if tgt in metadata["tok_languages"][split] else None
        text = options.get("text", "raw")
        if text == "raw":
            return _Fields(inputs=src, targets=tgt, tok_references=tok)
        if text == "lc_tok":
            return _Fields(inputs=src, targets=tgt, moses_languages=(src, tgt))
        if text != "tok":
            raise ValueError(
                f"multi30k: text={text!r} is unknown; use 'raw' (cased text), 'tok' (tok/ files, en and de) or "
                "'lc_tok' (raw text lowercased and Moses-tokenized on reading, as tok/ was made; any language)"
            )
        missing = [lang for lang in (src, tgt) if lang not in metadata["tok_languages"][split]]
        if missing:
            raise ValueError(
                f"multi30k split {split!r} has no tokenized {missing[0]!r} text (tok/ has en and de only); "
                "use text='raw'"
            )
        return _Fields(inputs=f"tok_{src}", targets=f"tok_{tgt}", tok_references=tok, reference_text=tgt)
    default = ("de", "en") if name == "iwslt14_de_en" else builder.TEXT
    src, tgt = _pair(name, builder.TEXT, default, options.get("src_lang"), options.get("tgt_lang"))
    return _Fields(inputs=src, targets=tgt, tok_references=tgt if name == "iwslt14_de_en" else None)


class TfdsSource(Source):
    """A split of a prepared TFDS dataset (array_record), back in the original file order when it has ``id``."""

    def __init__(
        self, name: str, split: str, builder: tfds.core.DatasetBuilder, fields: _Fields, tfds_data_dir: str | None
    ):
        self.name, self.split, self._fields, self._tfds_data_dir = name, split, fields, tfds_data_dir
        self._data = builder.as_data_source(split)
        self._lists = builder.LISTS if isinstance(builder, _CorpusBuilder) else None
        self._order = self._original_order(builder) if self._lists is not None else None

    def _parse(self, raw: bytes) -> dict[str, Any]:
        # Our builders hold only text, text lists and ints: parsing the tf.train.Example directly is ~10x faster
        # than TFDS's generic NumPy decoder (~30 us instead of ~300 us per record on these CPUs).
        features = tf_example_pb2.Example.FromString(raw).features.feature
        values = {key: feature.bytes_list.value or feature.int64_list.value for key, feature in features.items()}
        return {key: list(value) if key in self._lists else value[0] for key, value in values.items()}

    def _original_order(self, builder: tfds.core.DatasetBuilder) -> np.ndarray:
        # TFDS stores records in a hashed order: read every id once (~0.4 s for 29k records) and invert.
        n, read = len(self._data), self._data.data_source.__getitems__
        raws = (raw for start in range(0, n, 65536) for raw in read(range(start, min(n, start + 65536))))
        ids = np.fromiter((self._parse(raw)["id"] for raw in raws), dtype=np.int64, count=n)
        order = np.argsort(ids)
        if not np.array_equal(ids[order], np.arange(n)):
            raise RuntimeError(f"{builder.data_dir}: ids are not 0..{n - 1}; delete that folder to prepare it again")
        return order

    def __getstate__(self) -> dict[str, Any]:  # for grain workers: reopen instead of pickling file handles
        return {key: value for key, value in self.__dict__.items() if key != "_data"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.name.startswith("tfds:"):
            builder = tfds.builder(self.name[len("tfds:") :], data_dir=self._tfds_data_dir)
        else:
            builder = _open_builder(self.name, self._tfds_data_dir)
        self._data = builder.as_data_source(self.split)

    def __len__(self) -> int:
        return len(self._data)

    def _record(self, index: int) -> dict[str, Any]:
        if self._order is None:  # a catalog dataset: TFDS decodes
            return _make_record(index, self._data[index], self._fields)
        return _make_record(index, self._parse(self._data.data_source[int(self._order[index])]), self._fields)

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if self._order is None:
            return [self._record(i) for i in indices]
        raws = self._data.data_source.__getitems__([int(self._order[i]) for i in indices])
        return [_make_record(i, self._parse(raw), self._fields) for i, raw in zip(indices, raws, strict=True)]

    def _describe(self) -> str:
        f = self._fields
        return f"inputs={f.inputs!r}, targets={(f.references or f.targets)!r}"


def _open_builder(name: str, tfds_data_dir: str | None, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a local corpus, prepared on first use (later opens only read)."""
    builder = _BUILDERS[name](data_dir=tfds_data_dir, file_format="array_record")
    if not builder.is_prepared():
        manual_dir = data_root(data_dir) / builder.FOLDER
        if not manual_dir.is_dir():
            raise FileNotFoundError(
                f"{manual_dir} not found: the {name} corpus must be a folder {builder.FOLDER}/ of the data directory; "
                f"pass data_dir=/path/to/shared/data or set ${ENV_VAR}"
            )
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        builder.download_and_prepare(download_config=config, file_format="array_record")
    return builder


def _local_source(name: str, split: str, data_dir: str | None, tfds_data_dir: str | None, options: dict) -> Source:
    builder = _open_builder(name, tfds_data_dir, data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"{name} has no split {split!r}; known splits: {', '.join(builder.info.splits)}")
    metadata = dict(builder.info.metadata or {})
    fields = _local_fields(name, split, metadata, options)
    return TfdsSource(name, split, builder, fields, tfds_data_dir)


# ---------------------------------------------------------------------------------------------------- TFDS catalog

_CATALOG_FIELDS = {
    "cnn_dailymail": _Fields(inputs="article", targets="highlights"),
    "xsum": _Fields(inputs="document", targets="summary"),
    "c4": _Fields(inputs="text", targets_empty=True),
    "aeslc": _Fields(inputs="email_body", targets="subject_line"),
}


def _catalog_fields(catalog: str, features: list[str], options: dict) -> _Fields:
    """Feature names of a TFDS catalog dataset -> record fields (input_key/target_key or src_lang/tgt_lang override)."""
    base = catalog.split("/")[0].split(":")[0]
    if "input_key" in options or "target_key" in options:
        if not {"input_key", "target_key"} <= set(options):
            raise ValueError(f"tfds:{catalog}: pass both input_key= and target_key= (features: {', '.join(features)})")
        fields = _Fields(inputs=options["input_key"], targets=options["target_key"])
    elif base in _CATALOG_FIELDS:
        fields = _CATALOG_FIELDS[base]
    elif len(features) == 2 or "src_lang" in options:  # translation: one text feature per language
        languages = tuple(sorted(features))
        other = [lang for lang in languages if lang != "en"]
        default = ("en", other[0]) if "en" in languages and other else languages
        src, tgt = _pair(f"tfds:{catalog}", languages, default, options.get("src_lang"), options.get("tgt_lang"))
        fields = _Fields(inputs=src, targets=tgt)
    else:
        raise ValueError(f"tfds:{catalog}: pass input_key= and target_key=, features are {', '.join(features)}")
    for key in (fields.inputs, fields.targets):
        if key is not None and key not in features:
            raise ValueError(f"tfds:{catalog}: no feature {key!r}; features are {', '.join(features)}")
    return fields


def _catalog_source(catalog: str, split: str, tfds_data_dir: str | None, options: dict) -> Source:
    _check_options(f"tfds:{catalog}", options, ("src_lang", "tgt_lang", "input_key", "target_key"))
    try:
        builder = tfds.builder(catalog, data_dir=tfds_data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    except Exception as error:  # TFDS raises many kinds (not found without TF, network, checksum): one message
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        raise RuntimeError(
            f"TFDS dataset {catalog!r} could not be downloaded/prepared ({reason}); this needs internet access and "
            f"TensorFlow (pip install '.[tf]'), or a TFDS_DATA_DIR / tfds_data_dir where it is already prepared "
            f"with file_format='array_record'"
        ) from None
    if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"tfds:{catalog} has no split {split!r}; known splits: {', '.join(builder.info.splits)}")
    fields = _catalog_fields(catalog, list(builder.info.features.keys()), options)
    try:
        return TfdsSource(f"tfds:{catalog}", split, builder, fields, tfds_data_dir)
    except (ValueError, NotImplementedError) as error:
        raise RuntimeError(f"tfds:{catalog} at {builder.data_dir} cannot be read without TensorFlow: {error}") from None


# ---------------------------------------------------------------------------------------------------- synthetic numbers

_SYNTHETIC_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
_VARIANTS = ("british", "no_hyphen", "digits", "digits_commas", "capitalized")


class SyntheticNumbers(Source):
    """English number words -> German number words; record i is a pure function of (seed, split, i).

    A record draws a number of digits uniformly (1.. for train, 4.. for validation/test, up to max_value's), then a
    uniform number with that many digits, again until the number belongs to the split. The split of a number is fixed
    by a hash of the number alone (`number_split`): no number is in two splits, whatever the seeds.
    With probability ``noise`` the English side takes one variant: British 'and', no hyphen, digits, digits with
    commas, or a capital first letter.
    """

    name = "synthetic_numbers"

    def __init__(
        self, split: str, seed: int = 0, max_value: int = 999_999, noise: float = 0.2, num_examples: int | None = None
    ):
        if not 9_999 <= max_value < 10**9:
            raise ValueError(f"synthetic_numbers: max_value={max_value} must be in 9,999..999,999,999")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"synthetic_numbers: noise={noise} must be in [0, 1]")
        self.split, self.seed, self.max_value, self.noise = split, int(seed), int(max_value), float(noise)
        self._length = int(num_examples) if num_examples is not None else (2**31 - 1 if split == "train" else 1000)

    def __len__(self) -> int:
        return self._length

    def number(self, index: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, _SYNTHETIC_SPLIT_INDEX[self.split], index])
        top, fewest = len(str(self.max_value)), 1 if self.split == "train" else 4
        while True:  # rejection sampling: about 1 in 50 candidates belongs to validation / test
            digits = rng.integers(fewest, top + 1, size=256)
            low = np.where(digits == 1, 0, 10 ** (digits - 1))
            candidates = rng.integers(low, np.minimum(10**digits - 1, self.max_value), endpoint=True)
            hits = np.flatnonzero(number_split(candidates) == self.split)
            if hits.size:
                return int(candidates[hits[0]]), rng

    def _record(self, index: int) -> dict[str, Any]:
        n, rng = self.number(index)
        variant = _VARIANTS[rng.integers(len(_VARIANTS))] if rng.random() < self.noise else ""
        english = english_number(n, british=variant == "british", hyphen=variant != "no_hyphen")
        if variant == "digits":
            english = str(n)
        elif variant == "digits_commas":
            english = f"{n:,}"
        elif variant == "capitalized":
            english = english[0].upper() + english[1:]
        german = german_number(n)
        return {"id": index, "inputs": english, "targets": german, "references": [german]}

    def _describe(self) -> str:
        return f"seed={self.seed}, max_value={self.max_value}, noise={self.noise}"


# ---------------------------------------------------------------------------------------------------- entry point


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}")


def get_source(
    name: str, split: str, *, data_dir: str | None = None, tfds_data_dir: str | None = None, **options: Any
) -> Source:
    """A random-access source of ``{'id', 'inputs', 'targets', 'references'[, 'tok_references']}`` records.

    ``name`` is one of `list_sources()` or ``tfds:<catalog name>``; ``data_dir`` locates the local corpora
    (see `paths.data_root`), ``tfds_data_dir`` where TFDS prepares them (default: $TFDS_DATA_DIR, else TFDS's own).
    """
    if name.startswith("tfds:"):
        return _catalog_source(name[len("tfds:") :], split, tfds_data_dir, options)
    if name == _MONOLINGUAL:
        _check_options(name, options, ("part", "max_chars"))
        from t5x_lite.data import monolingual

        if split not in monolingual.SPLITS:
            raise ValueError(f"{name} has no split {split!r}; known splits: {', '.join(monolingual.SPLITS)}")
        max_chars = int(options.get("max_chars", monolingual.DEFAULT_MAX_CHARS))
        data_dir = str(data_root(data_dir))  # resolved here so that the cache key names the real folder
        return _monolingual_source(split, options.get("part", "all"), max_chars, data_dir, tfds_data_dir)
    if name not in SPLITS and name not in _FILE_SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(list_sources())}, tfds:<catalog name>")
    if name in SPLITS and split not in SPLITS[name]:
        raise ValueError(f"{name} has no split {split!r}; known splits: {', '.join(SPLITS[name])}")
    if name == "synthetic_numbers":
        _check_options(name, options, ("seed", "max_value", "noise", "num_examples"))
        return SyntheticNumbers(split, **options)
    if name == "text_files":
        _check_options(name, options, ("source_path", "target_path"))
        if set(options) != {"source_path", "target_path"}:
            raise ValueError("text_files needs both options source_path=... and target_path=...")
        return _text_files_source(split, **options)
    if name == "jsonl":
        _check_options(name, options, ("path", "input_key", "target_key", "references_key"))
        if "path" not in options:
            raise ValueError("jsonl needs the option path=... (and input_key=, target_key= unless 'inputs'/'targets')")
        return _jsonl_source(split, **options)
    return _local_source(name, split, data_dir, tfds_data_dir, options)
