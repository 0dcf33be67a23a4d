"""Evaluation metrics: sacreBLEU settings, tokenized BLEU (Multi30k's Moses pipeline), ROUGE, the dispatcher."""

from __future__ import annotations

import gzip
import math

import pytest

from t5x_lite import metrics

CAT = "the cat is on the mat"


@pytest.mark.parametrize("score_fn", [metrics.sacrebleu_13a, metrics.sacrebleu_intl])
def test_bleu_of_a_reference_against_itself_is_100(score_fn):
    texts = [CAT, "A dog runs through the snow, doesn't it?"]
    assert score_fn(texts, [[t] for t in texts]).score == pytest.approx(100.0)


def _hand_bleu(correct: list[int], total: list[int], hyp_len: int, ref_len: int) -> float:
    """BLEU-4 with sacreBLEU's 'exp' smoothing: the k-th zero n-gram count becomes 1 / 2**k matches."""
    precisions, zeros = [], 0
    for c, t in zip(correct, total, strict=True):
        if c == 0:
            zeros += 1
            precisions.append(1 / (2**zeros * t))
        else:
            precisions.append(c / t)
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


@pytest.mark.parametrize(
    "predictions, references, correct, total, hyp_len, ref_len",
    [
        # 1-grams the,cat,on,the,mat all match; 2-grams: the cat, on the, the mat of 4; 3-grams: on the mat of 3;
        # 4-grams: none of 2 (smoothed to 1/4); 5 tokens against 6: BP = exp(1 - 6/5).
        (["the cat on the mat"], [CAT], [5, 3, 1, 0], [5, 4, 3, 2], 5, 6),
        # Corpus BLEU sums the counts: "a dog" adds 2 unigrams and 1 bigram (both matching), no 3- or 4-grams.
        (["the cat on the mat", "a dog"], [CAT, "a dog"], [7, 4, 1, 0], [7, 5, 3, 2], 7, 8),
    ],
)
def test_bleu_matches_a_hand_computation(predictions, references, correct, total, hyp_len, ref_len):
    expected = _hand_bleu(correct, total, hyp_len, ref_len)
    for score_fn in (metrics.sacrebleu_13a, metrics.sacrebleu_intl):
        result = score_fn(predictions, [[r] for r in references])
        assert abs(result.score - expected) < 1e-6
        assert f"hyp_len = {hyp_len} ref_len = {ref_len}" in result.details


def test_bleu_with_uneven_numbers_of_references():
    predictions = [CAT, "a dog runs"]
    one_ref = metrics.sacrebleu_13a(predictions, [[CAT], ["a cat walks"]])
    two_refs = metrics.sacrebleu_13a(predictions, [[CAT], ["a cat walks", "a dog runs"]])
    assert one_ref.score < 100.0
    assert two_refs.score == pytest.approx(100.0)
    assert "nrefs:var" in two_refs.signature
    # A bare string counts as one reference (not as a list of characters).
    assert metrics.sacrebleu_13a(predictions, [CAT, "a dog runs"]).score == pytest.approx(100.0)


def test_bleu_signatures_name_the_setting():
    refs = [[CAT]]
    standard, t5 = metrics.sacrebleu_13a([CAT], refs), metrics.sacrebleu_intl([CAT], refs)
    assert "tok:13a" in standard.signature and "smooth:exp" in standard.signature
    assert "tok:intl" in t5.signature and "smooth:exp" in t5.signature
    assert "case:mixed" in standard.signature and "nrefs:1" in standard.signature
    assert standard.details.startswith("BLEU = 100.00 100.0/100.0/100.0/100.0 (BP = 1.000")


def test_moses_tokenize_lowercases_normalizes_and_escapes():
    assert metrics.moses_tokenize('A man\'s "Big" Hat (red).', "en") == "a man &apos;s &quot; big &quot; hat ( red ) ."
    # German quotes become '"'; at the end of the line the period moves after the quote, as Perl's
    # normalize-punctuation.perl does (it sees the trailing newline); Perl's "’" -> '"' quirk is reproduced.
    assert metrics.moses_tokenize("Er sagt: „Come on ... tea.“", "de") == "er sagt : &quot; come on ... tea &quot; ."
    assert metrics.moses_tokenize("Das „Hook ’em Horns“-Zeichen.", "de") == (
        "das &quot; hook &quot; em horns &quot; -zeichen ."
    )


def test_tokenized_bleu_processes_hypotheses_not_references():
    raw, tok = "A Man, in a Hat.", "a man , in a hat ."
    assert metrics.tokenized_bleu([raw], [[tok]], lang="en").score == pytest.approx(100.0)
    assert metrics.sacrebleu_13a([raw], [[tok]]).score < 50.0  # case and spacing differ without the Moses pipeline
    assert "tok:none" in metrics.tokenized_bleu([raw], [[tok]], lang="en").signature


@pytest.mark.parametrize("lang", ["de", "en"])
def test_tokenized_bleu_reproduces_multi30k_tok_references_from_raw_text(shared_data, lang):
    def lines(path):
        with gzip.open(shared_data / "multi30k" / path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()

    raw = lines(f"raw/test_2016_flickr.{lang}.gz")
    tok = lines(f"tok/test_2016_flickr.lc.norm.tok.{lang}.gz")
    assert len(raw) == len(tok) == 1000
    differing = sum(metrics.moses_tokenize(r, lang) != t for r, t in zip(raw, tok, strict=True))
    result = metrics.tokenized_bleu(raw, [[t] for t in tok], lang=lang)
    # Measured: 100.0 with no differing line for both languages (sacremoses 0.2.0, sacreBLEU 2.6.0).
    assert result.score >= 99.9, f"{result.details}; {differing} lines differ"
    assert differing <= 2


def test_rouge_of_identical_text_is_100():
    texts = [CAT, "Sentence one . Sentence two ."]
    scores = metrics.rouge(texts, [[t] for t in texts])
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all(value == pytest.approx(100.0) for value in scores.values())


def test_rouge1_matches_a_hand_computation():
    # "the cat sat" vs "the cat is on the mat": 2 unigrams in common, P = 2/3, R = 2/6, F = 2PR / (P + R) = 4/9.
    precision, recall = 2 / 3, 2 / 6
    expected = 100 * 2 * precision * recall / (precision + recall)
    scores = metrics.rouge(["the cat sat"], [[CAT]])
    assert scores["rouge1"] == pytest.approx(expected, abs=1e-9)
    assert scores["rougeL"] == pytest.approx(expected, abs=1e-9)  # LCS "the cat" is also 2 tokens


def test_rouge_takes_the_best_reference_and_averages_examples():
    best = metrics.rouge(["the cat sat"], [["a dog barked", "the cat sat"]])
    assert best == metrics.rouge(["the cat sat"], [["the cat sat", "a dog barked"]])
    assert best["rouge1"] == pytest.approx(100.0)
    mixed = metrics.rouge(["the cat sat", "the cat sat"], [["the cat sat"], [CAT]])
    assert mixed["rouge1"] == pytest.approx((100.0 + 400 / 9) / 2)


def test_rouge_lsum_splits_sentences_at_tokenized_full_stops():
    # T5's convention: " . " ends a sentence; rougeLsum matches sentence by sentence, rougeL the whole text.
    scores = metrics.rouge(["c d . a b"], [["a b . c d"]])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_compute_metrics_gives_flat_scores_and_bleu_signatures():
    records = [
        {"references": ["A man's hat."], "tok_references": ["a man &apos;s hat ."]},
        {"references": ["Two dogs.", "A pair of dogs."], "tok_references": ["two dogs ."]},
    ]
    report = metrics.compute_metrics(
        ["bleu", "tok_bleu", "rouge", "exact_match"], ["A man's hat.", "A pair of dogs."], records, target_lang="en"
    )
    keys = {"bleu", "bleu_intl", "tok_bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"}
    assert set(report.scores) == keys
    assert report.scores["bleu"] == pytest.approx(100.0) and report.scores["exact_match"] == 100.0
    assert report.scores["tok_bleu"] < 100.0  # the tokenized set has one reference per example only
    assert set(report.signatures) == {"bleu", "bleu_intl", "tok_bleu"}
    assert "tok:intl" in report.signatures["bleu_intl"]


def test_tokenized_targets_are_scored_verbatim_and_detokenized_for_sacrebleu():
    """A model trained on Multi30k's tok/ files writes lowercased tokenized text with Moses' entities: tok_bleu takes
    it as it is (tokenizing it again would escape the escapes), sacreBLEU scores its detokenized form, lowercased."""
    prediction = "a man &apos;s hat , &quot; red &quot; ."
    assert metrics.moses_tokenize(prediction, "en") != prediction  # why verbatim: "&" would become "&amp;"
    assert metrics.moses_detokenize(prediction, "en") == 'a man\'s hat, "red".'
    assert metrics.moses_detokenize("", "en") == ""
    records = [{"references": ['A man\'s hat, "red".'], "tok_references": [prediction]}]
    report = metrics.compute_metrics(
        ["bleu", "tok_bleu"], [prediction], records, target_lang="en", target_format="moses_lc_tok"
    )
    assert report.scores["tok_bleu"] == pytest.approx(100.0) and report.scores["bleu"] == pytest.approx(100.0)
    assert "case:lc" in report.signatures["bleu"] and "tok:none" in report.signatures["tok_bleu"]
    plain = metrics.compute_metrics(["tok_bleu"], [prediction], records, target_lang="en")
    assert plain.scores["tok_bleu"] < 100.0


def test_bad_inputs_raise_clear_errors():
    records = [{"references": [CAT]}]
    with pytest.raises(ValueError, match="2 predictions but 1 records"):
        metrics.compute_metrics(["bleu"], [CAT, CAT], records)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        metrics.sacrebleu_13a([CAT], [[CAT], [CAT]])
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['meteor'\]; known: bleu, tok_bleu, rouge"):
        metrics.compute_metrics(["bleu", "meteor"], [CAT], records)
    with pytest.raises(ValueError, match="1 of 1 records have no 'tok_references'"):
        metrics.compute_metrics(["tok_bleu"], [CAT], records, target_lang="en")
    with pytest.raises(ValueError, match="needs target_lang"):
        metrics.compute_metrics(["tok_bleu"], [CAT], [{"references": [CAT], "tok_references": [CAT]}])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.compute_metrics(["rouge"], [], [])
    with pytest.raises(ValueError, match="no reference"):
        metrics.rouge([CAT], [[]])
