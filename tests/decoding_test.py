"""Decoding: greedy agrees with the teacher-forced pass, beam search with a plain NumPy beam search, and the
degenerate settings of beam search and sampling with greedy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import decoding
from t5x_lite.network import Transformer, TransformerConfig
from tests.conftest import CLASSIC_POST_LN_SINUSOIDAL, random_params

EOS = 1
SMALL = dict(vocab_size=24, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=2)
MODELS = {
    "v1_0_relu_tied": dict(SMALL, mlp_activation="relu"),
    "v1_1_gated_untied_scanned": dict(
        SMALL, mlp_activation="gated-gelu", tie_word_embeddings=False, rescale_logits=False, scan_layers=True
    ),
    "classic_post_ln_sinusoidal": dict(SMALL, **CLASSIC_POST_LN_SINUSOIDAL),
}


def _model(name: str, seed: int = 3):
    """A random model whose EOS output is scaled up, so that some hypotheses end early and some do not."""
    cfg = TransformerConfig(**MODELS[name], dropout_rate=0.0)
    params = random_params(cfg, seed=seed)
    if cfg.tie_word_embeddings:
        params["token_embedder"]["embedding"][EOS] *= 6.0
    else:
        params["decoder"]["logits_dense"]["kernel"][:, EOS] *= 2.0
    return cfg, params


def _inputs(batch: int, vocab: int, seed: int = 0) -> jax.Array:
    tokens = np.random.default_rng(seed).integers(2, vocab, (batch, 7))
    tokens[1 % batch, 4:] = 0  # a padded row
    return jnp.asarray(tokens, jnp.int32)


def test_first_argmax_is_argmax_with_ties_to_the_first_index():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (64, 37)).astype(np.float32)  # many ties
    x[5] = decoding.NEG_INF
    x[6, 10:] = x[6].max() + 1.0  # the first of a run of equal maxima
    np.testing.assert_array_equal(decoding.first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
    y = rng.normal(size=(2, 3, 300)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(decoding.first_argmax)(jnp.asarray(y)), np.argmax(y, axis=-1))


def test_greedy_tokens_are_the_argmax_of_the_full_pass_on_them():
    cfg = TransformerConfig(**{**SMALL, "vocab_size": 40}, dropout_rate=0.0)
    params = random_params(cfg, seed=3)
    inputs = _inputs(3, 40)
    tokens, scores = decoding.greedy_decode(cfg, params, inputs, max_decode_length=9, vocab_limit=30)
    tokens = np.asarray(tokens)
    assert tokens.shape == (3, 9) and tokens.max() < 30
    decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    logits = np.asarray(Transformer(cfg).apply({"params": params}, inputs, decoder_inputs), np.float64)[..., :30]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for row in range(3):
        ends = np.flatnonzero(tokens[row] == EOS)
        stop = ends[0] + 1 if ends.size else 9
        np.testing.assert_array_equal(tokens[row, :stop], log_probs[row, :stop].argmax(-1))
        assert (tokens[row, stop:] == 0).all(), "nothing after EOS"
        expected = log_probs[row, np.arange(stop), tokens[row, :stop]].sum()
        np.testing.assert_allclose(scores[row], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ NumPy reference


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, encoder, decoder):
    return Transformer(cfg).apply({"params": params}, encoder, decoder)


def _full_pass_log_probs(cfg, params, encoder_row: np.ndarray, steps: int, rows: int):
    """prefixes -> next-token log-probabilities (float64), from teacher-forced passes (no cache involved)."""

    def log_probs(prefixes: list[tuple[int, ...]]) -> np.ndarray:
        decoder = np.zeros((rows, steps), np.int32)  # always ``rows`` rows: one compilation
        for i, prefix in enumerate(prefixes):
            decoder[i, 1 : len(prefix) + 1] = prefix[: steps - 1]
        encoder = np.repeat(encoder_row[None], rows, axis=0)
        logits = np.asarray(_forward(cfg, params, encoder, decoder), np.float64)
        picked = logits[np.arange(len(prefixes)), [len(p) for p in prefixes]]
        shifted = picked - picked.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    return log_probs


def reference_beam_search(log_probs_fn, beam: int, steps: int, alpha: float, eos: int = EOS):
    """Textbook beam search on one example: expand every live hypothesis by every token, rank all candidates;
    an EOS candidate ranked among the best ``beam`` finishes (score = log-prob / GNMT penalty), the best
    ``beam`` others live on; stop when ``beam`` are finished and no live one can beat the worst of them."""
    penalty = lambda length: ((5.0 + length) / 6.0) ** alpha
    live = [((), 0.0)]
    finished: list[tuple[float, tuple[int, ...]]] = []
    for position in range(steps):
        table = log_probs_fn([prefix for prefix, _ in live])
        candidates = [
            (logp + table[b, t], b * table.shape[1] + t, b, t)
            for b, (_, logp) in enumerate(live)
            for t in range(table.shape[1])
        ]
        candidates.sort(key=lambda c: (-c[0], c[1]))
        top = candidates[: 2 * beam]
        for logp, _, b, t in top[:beam]:
            if t == eos:
                finished.append((logp / penalty(position + 1), live[b][0] + (t,)))
        finished = sorted(finished, key=lambda f: -f[0])[:beam]
        live = [(live[b][0] + (t,), logp) for logp, _, b, t in top if t != eos][:beam]
        if len(finished) == beam and finished[-1][0] >= max(lp for _, lp in live) / penalty(steps):
            break
    if not finished:
        return [(logp / penalty(steps), prefix) for prefix, logp in live]
    return finished


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_equals_a_numpy_reference(name, alpha):
    cfg, params = _model(name)
    beam, steps = 3, 8
    inputs = _inputs(4, cfg.vocab_size, seed=1)
    tokens, scores = decoding.beam_search(cfg, params, inputs, beam_size=beam, max_decode_length=steps, alpha=alpha)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert tokens.shape == (4, beam, steps) and scores.shape == (4, beam)
    ended_early = 0
    for row in range(4):
        expected = reference_beam_search(
            _full_pass_log_probs(cfg, params, np.asarray(inputs[row]), steps, beam), beam, steps, alpha
        )
        for i, (score, sequence) in enumerate(expected):
            padded = np.zeros(steps, np.int32)
            padded[: len(sequence)] = sequence
            np.testing.assert_array_equal(tokens[row, i], padded, err_msg=f"row {row} hypothesis {i}")
            np.testing.assert_allclose(scores[row, i], score, rtol=1e-5, atol=1e-5)
            ended_early += len(sequence) < steps
    assert 0 < ended_early < 4 * beam, "the test should see hypotheses ending before the maximum length and not"


def test_beam_search_stops_early_and_respects_the_vocab_limit():
    cfg, params = _model("v1_0_relu_tied")
    inputs = _inputs(2, cfg.vocab_size)
    tokens, _ = decoding.beam_search(cfg, params, inputs, beam_size=2, max_decode_length=30, vocab_limit=20)
    assert np.asarray(tokens).max() < 20
    with pytest.raises(ValueError, match="beam_size=0"):
        decoding.beam_search(cfg, params, inputs, beam_size=0, max_decode_length=4)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_size_one_is_greedy(alpha):
    cfg, params = _model("v1_1_gated_untied_scanned")
    inputs = _inputs(6, cfg.vocab_size, seed=2)
    greedy, greedy_scores = decoding.greedy_decode(cfg, params, inputs, max_decode_length=10)
    beam, beam_scores = decoding.beam_search(cfg, params, inputs, beam_size=1, max_decode_length=10, alpha=alpha)
    np.testing.assert_array_equal(beam[:, 0], greedy)
    if alpha == 0.0:
        np.testing.assert_allclose(beam_scores[:, 0], greedy_scores, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("setting", [dict(temperature=0.0), dict(temperature=1e-4), dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_sampling_is_greedy(setting):
    cfg, params = _model("v1_0_relu_tied")
    inputs = _inputs(5, cfg.vocab_size, seed=4)
    greedy, scores = decoding.greedy_decode(cfg, params, inputs, max_decode_length=10)
    sampled, sampled_scores = decoding.sample_decode(
        cfg, params, inputs, jax.random.key(7), max_decode_length=10, **setting
    )
    np.testing.assert_array_equal(sampled, greedy)
    np.testing.assert_allclose(sampled_scores, scores, rtol=1e-5)


def test_sampling_is_reproducible_and_follows_the_model():
    cfg, params = _model("v1_0_relu_tied")
    inputs = jnp.tile(_inputs(1, cfg.vocab_size, seed=5), (4000, 1))
    sample = functools.partial(decoding.sample_decode, cfg, params, inputs, max_decode_length=1)
    first, _ = sample(jax.random.key(1))
    again, _ = sample(jax.random.key(1))
    other, _ = sample(jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    logits = np.asarray(Transformer(cfg).apply({"params": params}, inputs[:1], jnp.zeros((1, 1), jnp.int32)))[0, 0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    frequencies = np.bincount(np.asarray(first)[:, 0], minlength=cfg.vocab_size) / 4000
    np.testing.assert_allclose(frequencies, probs, atol=0.03)
    top3, _ = decoding.sample_decode(cfg, params, inputs, jax.random.key(3), max_decode_length=1, top_k=3)
    assert set(np.unique(top3)) <= set(np.argsort(-probs)[:3])


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    log_probs = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda p: np.flatnonzero(
        np.asarray(decoding.filter_logits(log_probs, temperature=1.0, top_k=0, top_p=p))[0] > -1e6
    )
    assert kept(0.5).tolist() == [0]
    assert kept(0.6).tolist() == [0, 2]
    assert kept(0.81).tolist() == [0, 2, 3]
    assert kept(1.0).tolist() == [0, 1, 2, 3]
    top2 = np.asarray(decoding.filter_logits(log_probs, temperature=2.0, top_k=2, top_p=1.0))[0]
    np.testing.assert_allclose(top2[[0, 2]], np.log([0.5, 0.3]) / 2, rtol=1e-6)
    assert (top2[[1, 3]] < -1e6).all()


def test_bad_sampling_settings_are_refused():
    cfg, params = _model("v1_0_relu_tied")
    with pytest.raises(ValueError, match="top_p=1.5"):
        decoding.sample_decode(cfg, params, _inputs(1, 24), jax.random.key(0), max_decode_length=2, top_p=1.5)
