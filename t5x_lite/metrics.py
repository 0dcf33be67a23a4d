"""Evaluation scores computed the way published numbers are, and the metric writers.

Scores: sacreBLEU (``13a`` and T5's ``intl`` settings), BLEU on Moses-tokenized lowercased text (for papers that
scored the official ``tok/`` files), ROUGE-1/2/L/Lsum with Google's ``rouge_score``, and exact match;
``compute_metrics`` maps the task registry's metric names onto them. Every logged step goes to ``metrics.jsonl``
(one JSON object per step, flat keys) and to TensorBoard."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from t5x_lite import fileio


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str]) -> float:
    """Percentage of predictions equal (after stripping) to one of their references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = 0
    for prediction, refs in zip(predictions, references, strict=True):
        options = [refs] if isinstance(refs, str) else list(refs)
        hits += prediction.strip() in {r.strip() for r in options}
    return 100.0 * hits / len(predictions)


@dataclasses.dataclass(frozen=True)
class BleuScore:
    """A corpus BLEU score (0..100), sacreBLEU's signature of the setting, and its details line
    (``BLEU = 40.94 100.0/75.0/33.3/25.0 (BP = 0.819 ratio = 0.833 hyp_len = 5 ref_len = 6)``)."""

    score: float
    signature: str
    details: str


def _reference_lists(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> list[list[str]]:
    """One list of references per example (a bare string is one reference), checked against ``predictions``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score: an empty evaluation set is an error, not a score of 0")
    lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if empty := [i for i, refs in enumerate(lists) if not refs]:
        raise ValueError(f"{len(empty)} example(s) have no reference, e.g. index {empty[0]}")
    return lists


def _reference_streams(lists: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transposes per-example references into sacreBLEU's reference streams; ``None`` pads the examples that have
    fewer references (sacreBLEU 2.x skips ``None`` and reports ``nrefs:var``)."""
    width = max(len(refs) for refs in lists)
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]


def bleu(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    smooth_method: str = "exp",
    lowercase: bool = False,
) -> BleuScore:
    """sacreBLEU corpus BLEU; ``references[i]`` holds the references of example i (their number may vary)."""
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(_reference_lists(predictions, references))
    # force: sacreBLEU warns about "tokenized periods", which are expected when the text is already tokenized.
    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, force=tokenize == "none")
    result = metric.corpus_score(list(predictions), streams)
    return BleuScore(float(result.score), str(metric.get_signature()), result.format())


def sacrebleu_13a(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> BleuScore:
    """The standard sacreBLEU setting (cased, ``tok:13a``, ``smooth:exp``), as WMT papers report it."""
    return bleu(predictions, references, tokenize="13a", smooth_method="exp")


def sacrebleu_intl(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> BleuScore:
    """T5's setting (``t5.evaluation.metrics.bleu``: cased, ``tok:intl``, ``smooth:exp``)."""
    return bleu(predictions, references, tokenize="intl", smooth_method="exp")


@functools.cache
def _moses(lang: str) -> tuple[Any, Any]:
    """sacremoses' punctuation normalizer (``perl_parity``: the Perl script's ``’`` -> ``"``) and tokenizer."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    return MosesPunctNormalizer(lang=lang, perl_parity=True), MosesTokenizer(lang=lang)


def moses_tokenize(text: str, lang: str) -> str:
    """Multi30k's ``tok/`` preprocessing: Moses ``lowercase.perl | normalize-punctuation.perl -l L |
    tokenizer.perl -l L``, escaping as tokenizer.perl does by default (``'`` -> ``&apos;``, ``"`` -> ``&quot;``)."""
    normalizer, tokenizer = _moses(lang)
    # Perl reads the line with its "\n", which lets the de/fr rule `(\.+)"(\s*[^<])` -> `"$1$2` fire at the end.
    normalized = normalizer.normalize(text.lower() + "\n")
    return tokenizer.tokenize(normalized, return_str=True, escape=True)


def moses_detokenize(text: str, lang: str) -> str:
    """Moses-tokenized text (entities such as ``&apos;`` included) back to plain text, for sacreBLEU."""
    return _moses_detokenizer(lang).detokenize(text.split(), unescape=True) if text.strip() else ""


@functools.cache
def _moses_detokenizer(lang: str):
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer(lang=lang)


def tokenized_bleu(
    predictions: Sequence[str], tok_references: Sequence[Sequence[str]], *, lang: str, pretokenized: bool = False
) -> BleuScore:
    """BLEU as papers scored Moses-tokenized lowercased files (multi-bleu.perl): hypotheses go through
    ``moses_tokenize`` (unless ``pretokenized``: a model trained on such files outputs them already); references
    are taken verbatim, already processed; sacreBLEU splits on spaces only."""
    hypotheses = list(predictions) if pretokenized else [moses_tokenize(prediction, lang) for prediction in predictions]
    return bleu(hypotheses, tok_references, tokenize="none", smooth_method="exp")


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _rouge_sentences(text: str) -> str:
    """T5's sentence split for rougeLsum (which reads one sentence per line): a newline after each `` . ``."""
    return text.replace(" . ", " .\n")


def rouge(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, use_stemmer: bool = True
) -> dict[str, float]:
    """Mean over examples of ROUGE-1/2/L/Lsum F-measure (0..100), each example scored against its best reference
    (per metric); ``rouge_score``'s tokenizer lowercases and keeps only ``[a-z0-9]`` runs. T5 reports the median
    of bootstrap means (``BootstrapAggregator``: random, close to the mean) and passes no ``use_stemmer``."""
    from rouge_score import rouge_scorer

    lists = _reference_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, refs in zip(predictions, lists, strict=True):
        scores = [scorer.score(_rouge_sentences(ref), _rouge_sentences(prediction)) for ref in refs]
        for key in ROUGE_KEYS:
            totals[key] += max(score[key].fmeasure for score in scores)
    return {key: 100.0 * total / len(lists) for key, total in totals.items()}


@dataclasses.dataclass(frozen=True)
class MetricReport:
    """Flat scores, 0..100 (``{'bleu': .., 'bleu_intl': .., 'tok_bleu': .., 'rouge1': .., 'exact_match': ..}``),
    and the sacreBLEU signature of each BLEU key."""

    scores: dict[str, float]
    signatures: dict[str, str]


METRIC_NAMES = ("bleu", "tok_bleu", "rouge", "exact_match")


def _field(records: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """``record[key]`` of every record; a ValueError says how many records lack it."""
    if missing := [i for i, record in enumerate(records) if key not in record]:
        raise ValueError(f"{len(missing)} of {len(records)} records have no {key!r} (first: index {missing[0]})")
    return [record[key] for record in records]


def _check_request(
    names: Sequence[str], predictions: Sequence[str], records: Sequence[Mapping[str, Any]], target_lang: str | None
) -> None:
    """Every error that ``compute_metrics`` can foresee, raised before any (slow) scoring starts."""
    if unknown := [name for name in names if name not in METRIC_NAMES]:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions but {len(records)} records (references)")
    if not predictions:
        raise ValueError("no predictions to score: an empty evaluation set is an error, not a score of 0")
    _field(records, "references")
    if "tok_bleu" in names:
        _field(records, "tok_references")
        if target_lang is None:
            raise ValueError("metric 'tok_bleu' needs target_lang (the Moses tokenizer's language), got None")


def _metric_values(
    name: str,
    predictions: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    target_lang: str | None,
    target_format: str,
) -> Mapping[str, float | BleuScore]:
    """The flat values of one registry metric name."""
    references = _field(records, "references")
    tokenized = target_format == "moses_lc_tok"
    if name == "bleu" and tokenized:  # lowercased tokenized outputs: detokenize, score case-insensitively
        plain = [moses_detokenize(prediction, target_lang or "en") for prediction in predictions]
        return {
            "bleu": bleu(plain, references, tokenize="13a", lowercase=True),
            "bleu_intl": bleu(plain, references, tokenize="intl", lowercase=True),
        }
    if name == "bleu":
        return {"bleu": sacrebleu_13a(predictions, references), "bleu_intl": sacrebleu_intl(predictions, references)}
    if name == "tok_bleu":
        tok_references = _field(records, "tok_references")
        return {"tok_bleu": tokenized_bleu(predictions, tok_references, lang=target_lang, pretokenized=tokenized)}
    if name == "rouge":
        return rouge(predictions, references)
    return {"exact_match": exact_match(predictions, references)}


def compute_metrics(
    names: Sequence[str],
    predictions: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    *,
    target_lang: str | None = None,
    target_format: str = "text",
) -> MetricReport:
    """The task registry's metrics (``bleu`` gives ``bleu`` and ``bleu_intl``; ``tok_bleu`` needs
    ``record['tok_references']`` and ``target_lang``; ``rouge``; ``exact_match``); empty input is a ValueError.

    ``target_format='moses_lc_tok'`` (a task trained on lowercased Moses-tokenized text): ``tok_bleu`` scores the
    predictions as they are, and ``bleu``/``bleu_intl`` score their detokenized form case-insensitively
    (``case:lc`` in the signature) against the raw references."""
    _check_request(names, predictions, records, target_lang)
    scores: dict[str, float] = {}
    signatures: dict[str, str] = {}
    for name in names:
        for key, value in _metric_values(name, predictions, records, target_lang, target_format).items():
            if isinstance(value, BleuScore):
                scores[key], signatures[key] = value.score, value.signature
            else:
                scores[key] = float(value)
    return MetricReport(scores, signatures)


class MetricWriter:
    """Appends ``{'step': s, 'train/loss': ...}`` lines to WORKDIR/metrics.jsonl and scalars to TensorBoard
    (WORKDIR/tensorboard); WORKDIR may be a bucket URL (``gs://``)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = fileio.workdir_path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        self._events = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._events = fileio.MirroredDirectory(fileio.workdir_path(workdir) / "tensorboard")
            self._tensorboard = SummaryWriter(self._events.local)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in metrics.items()}
        fileio.append_text(self.path, json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")
        for key, value in values.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(key, value, int(step))
        self._tensorboard.flush()
        self._events.sync()

    def rewind(self, step: int) -> int:
        """A run resumed from the checkpoint of ``step``: the rows that a killed run wrote after that checkpoint
        (later steps, an earlier launch marker at ``step``, a half-written last line) are moved from metrics.jsonl
        to metrics.superseded.jsonl, so that each step is logged once and nothing is lost. Returns how many moved."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, superseded = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                at = int(row["step"])
            except (ValueError, KeyError, TypeError):
                superseded.append(line.rstrip("\n") + "\n")  # a line cut short by the kill
                continue
            launch_marker = set(row) == {"step", "perf/launched"}
            (superseded if at > step or (at == step and launch_marker) else kept).append(line)
        if superseded:
            fileio.append_text(self.path.with_name("metrics.superseded.jsonl"), "".join(superseded))
            fileio.write_bytes_atomic(self.path, "".join(kept).encode("utf-8"))
        return len(superseded)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._events.close()
            self._tensorboard = None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl (for tests and plots)."""
    text = (fileio.workdir_path(workdir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
