"""Local pre-training data (issue 14): passages, the held-out split, mixing by size, exact reconstruction,
and the vocabulary / eval-task choices of a fine-tuning run."""

from __future__ import annotations

import collections
import itertools
import unicodedata

import ml_collections
import numpy as np
import pytest

from t5x_lite import train
from t5x_lite.config_files import default_train_config
from t5x_lite.data import monolingual, pipeline, preprocessors
from t5x_lite.data.tasks import Mixture, TaskRegistry, rate_by_size
from t5x_lite.data.vocab import train_vocabulary

# ------------------------------------------------------------------------------------------------- passages


def test_split_passages_keeps_every_word_in_order_within_the_limit():
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), rng.integers(1, 12))) for _ in range(3000)]
    words[100] = "x" * 130  # a word longer than max_chars is cut, not dropped
    units, start = [], 0
    while start < len(words):
        stop = start + int(rng.integers(1, 80))
        chunk = words[start:stop]
        ends = rng.random(len(chunk)) < 0.1
        units.append(" ".join(w + ("." if end else "") for w, end in zip(chunk, ends, strict=True)))
        start = stop
    out = monolingual.split_passages(units, max_chars=50)
    assert all(0 < len(p) <= 50 for p in out)
    assert "".join("".join(out).split()) == "".join("".join(units).split())
    assert len(out) < len(" ".join(units)) / 25, "sentences are joined up to the limit, not one passage each"


def test_split_passages_short_units_stay_whole_and_bad_limits_are_refused():
    assert monolingual.split_passages(["A dog runs.", "  two   spaces  "], max_chars=400) == ["A dog runs. two spaces"]
    assert monolingual.split_passages(["A dog runs. A cat sits."], max_chars=16) == ["A dog runs.", "A cat sits."]
    with pytest.raises(ValueError, match="max_chars=4 is too small"):
        monolingual.split_passages(["text"], max_chars=4)


def test_held_out_is_a_function_of_the_text_and_about_one_in_a_hundred():
    texts = [f"passage number {i}" for i in range(20000)]
    chosen = [t for t in texts if monolingual.held_out(t)]
    assert 0.007 < len(chosen) / len(texts) < 0.013
    assert [t for t in reversed(texts) if monolingual.held_out(t)] == chosen[::-1]


def test_unknown_part_and_split_are_refused():
    with pytest.raises(ValueError, match="unknown monolingual part 'wiki'"):
        monolingual.passages("wiki", "train")
    with pytest.raises(ValueError, match="splits train, validation, not 'test'"):
        monolingual.passages("all", "test")


# ------------------------------------------------------------------------------------------------- mixtures


def test_mixture_weights_resolve_functions_and_normalize(tmp_path):
    for name, lines in (("small", ["ab"] * 10), ("large", ["abcd"] * 30)):
        (tmp_path / f"{name}.src").write_text("\n".join(lines) + "\n")
        (tmp_path / f"{name}.tgt").write_text("\n".join(["x"] * len(lines)) + "\n")
        TaskRegistry.add(
            f"mix_test_{name}",
            splits={"train": ("text_files", "train")},
            source_options={"source_path": str(tmp_path / f"{name}.src"), "target_path": str(tmp_path / f"{name}.tgt")},
        )
    try:
        small = TaskRegistry.get("mix_test_small")
        assert rate_by_size(small) == 10 * 3  # inputs and targets characters
        by_size = Mixture("m", {"mix_test_small": rate_by_size, "mix_test_large": rate_by_size})
        assert by_size.weights() == pytest.approx([30 / 180, 150 / 180])
        assert Mixture("m", {"mix_test_small": 1.0, "mix_test_large": 3.0}).weights() == [0.25, 0.75]
        with pytest.raises(ValueError, match="rate of 'mix_test_small' is 0.0; it must be positive"):
            Mixture("m", {"mix_test_small": lambda task, **_: 0.0, "mix_test_large": 1.0}).weights()
        with pytest.raises(ValueError, match="must be positive"):
            TaskRegistry.add_mixture("bad_mix", {"mix_test_small": -1.0})
    finally:
        TaskRegistry.remove("mix_test_small")
        TaskRegistry.remove("mix_test_large")


def _normalized(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def pretrain_data(shared_data, tmp_path_factory):
    """Every part's train passages and a small vocabulary trained on a sample of them (the real 16k one takes
    minutes to train; these checks do not depend on its size)."""
    del shared_data
    parts = {name: monolingual.passages(name, "train") for name in monolingual.PARTS}
    sample = [text for texts in parts.values() for text in texts[::40]]
    vocab = train_vocabulary(sample, vocab_size=2000, cache_dir=str(tmp_path_factory.mktemp("vocab")), name="mono")
    return parts, vocab


def test_local_pretrain_draws_every_part_at_its_rate_by_size(pretrain_data):
    parts, vocab = pretrain_data
    mixture = TaskRegistry.get("local_pretrain")
    assert set(mixture.rates) == {f"local_pretrain_{name}" for name in monolingual.PARTS}
    expected = dict(zip(monolingual.PARTS, mixture.weights(), strict=True))
    characters = {name: sum(map(len, texts)) for name, texts in parts.items()}
    total = sum(characters.values())
    assert expected == pytest.approx({name: count / total for name, count in characters.items()})

    owner, joined = {}, {}
    for name, texts in parts.items():
        decoded = [_normalized(vocab.decode(vocab.encode(text))) for text in texts]
        owner.update((text, name) for text in decoded if text not in owner)
        joined[name] = "\n".join(decoded)
    draws = 4000
    batches = pipeline.train_dataset(mixture, vocab, batch_size=50, seed=0, pack=False)
    counts, unknown = collections.Counter(), 0
    for batch in itertools.islice(iter(batches), draws // 50):
        for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"], strict=True):
            tokens = preprocessors.reconstruct_from_spans(inputs, targets, vocab.vocab_size, vocab.extra_ids)
            text = _normalized(vocab.decode(tokens))
            name = owner.get(text)
            if name is None:  # a passage longer than the 141 raw tokens gives a window of it
                name = next((part for part, whole in joined.items() if text in whole), None)
            if name is None:
                unknown += 1
            else:
                counts[name] += 1
    assert unknown < 0.01 * draws
    for name, share in expected.items():
        assert counts[name] > 0, f"no draw from {name}"
        assert abs(counts[name] / (draws - unknown) - share) < 0.02, (name, counts[name], share)


def test_pretraining_examples_reconstruct_the_original_text(pretrain_data):
    parts, vocab = pretrain_data
    task = TaskRegistry.get("local_pretrain_all")
    raw_length, _ = preprocessors.span_corruption_lengths(task.lengths["inputs"])
    rng = np.random.default_rng(0)
    texts = [text for texts in parts.values() for text in rng.choice(texts, 60, replace=False)]
    whole = 0
    for i, text in enumerate(texts):
        out = task.tokenize({"id": i, "inputs": text}, vocab, rng=np.random.default_rng(i))
        assert (out["inputs"] >= vocab.extra_id(99)).any(), "every example hides at least one span"
        tokens = preprocessors.reconstruct_from_spans(out["inputs"], out["targets"], vocab.vocab_size, vocab.extra_ids)
        original = vocab.encode(text)
        if len(original) <= raw_length:
            assert tokens == original
            assert vocab.decode(tokens) == vocab.decode(original)
            whole += 1
        else:  # a long passage: a contiguous window of raw_length tokens
            assert len(tokens) == raw_length
            assert any(original[s : s + raw_length] == tokens for s in range(len(original) - raw_length + 1))
    assert whole >= 0.85 * len(texts), "passages are cut to fit the input length (this 2,000-piece vocabulary)"


def test_no_evaluation_text_is_pre_trained_on(shared_data):
    del shared_data
    from t5x_lite.data.sources import get_source

    passages = {*monolingual.passages("multi30k_en", "train"), *monolingual.passages("multi30k_en", "validation")}
    train = {r["inputs"] for r in get_source("multi30k", "train", src_lang="en", tgt_lang="de")}
    for split in ("val", "test_2016_flickr", "test_2017_flickr"):
        evaluation = {r["inputs"] for r in get_source("multi30k", split, src_lang="en", tgt_lang="de")}
        assert not (evaluation - train) & passages, split
    for corpus, part in (("scitldr", "scitldr_abstracts"), ("aeslc", "aeslc_bodies")):
        train_text = " ".join(" ".join(r["inputs"].split()) for r in get_source(corpus, "train"))
        pretrain = monolingual.passages(part, "train")
        for passage in pretrain[:: max(1, len(pretrain) // 200)]:
            assert passage in train_text, (corpus, passage[:80])
        pretrain = set(pretrain)
        for record in itertools.islice(get_source(corpus, "test"), 300):
            for passage in monolingual.split_passages([record["inputs"]]):
                # SciTLDR itself repeats two abstracts and a few sentences between train and test
                assert passage not in pretrain or passage in train_text, (corpus, passage[:80])


# ------------------------------------------------------------------------------------------------- train config


def _config(**values) -> ml_collections.ConfigDict:
    config = default_train_config()
    for key, value in values.items():
        config[key] = value
    return config


def test_eval_task_of_a_mixture_must_be_named():
    mixture = TaskRegistry.get("local_pretrain")
    with pytest.raises(ValueError, match="is a mixture, which has no single eval split; set --config.eval_task"):
        train._eval_task(_config(eval_split="validation"), mixture)
    chosen = train._eval_task(_config(eval_task="local_pretrain_all", eval_split="validation"), mixture)
    assert chosen.name == "local_pretrain_all"
    with pytest.raises(ValueError, match="eval_split='test' is not a split of task 'local_pretrain_all'"):
        train._eval_task(_config(eval_task="local_pretrain_all", eval_split="test"), mixture)


def test_fine_tuning_takes_the_checkpoint_vocabulary_and_refuses_another(numbers, vocab, tmp_path):
    pretrained = tmp_path / "pretrained"
    other = train_vocabulary(
        [f"some other text number {i} entirely" for i in range(300)], vocab_size=40, cache_dir=str(tmp_path), name="o"
    )
    other.save(pretrained / "vocab")
    config = _config(init_from=str(pretrained), vocab_cache_dir=str(tmp_path / "cache"))
    assert train._vocabulary(config, numbers, str(tmp_path / "run1")) == other
    config.vocab_task = "synthetic_numbers"
    with pytest.raises(ValueError, match="differs from the one init_from=.* was trained with"):
        train._vocabulary(config, numbers, str(tmp_path / "run2"))
    with pytest.raises(FileNotFoundError, match="init_from=.*missing' is not a directory: train or convert"):
        train._vocabulary(_config(init_from=str(tmp_path / "missing")), numbers, str(tmp_path / "run4"))
    scratch = _config(vocab_task="synthetic_numbers", vocab_cache_dir=str(tmp_path / "cache"))
    assert train._vocabulary(scratch, TaskRegistry.get("local_span_corruption"), str(tmp_path / "run3")) == vocab
