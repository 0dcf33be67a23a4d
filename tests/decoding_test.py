"""Greedy decoding agrees with the teacher-forced pass it is built from."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t5x_lite import decoding
from t5x_lite.network import Transformer, TransformerConfig
from tests.conftest import random_params


def test_greedy_tokens_are_the_argmax_of_the_full_pass_on_them():
    cfg = TransformerConfig(
        vocab_size=40, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0
    )
    params = random_params(cfg, seed=3)
    inputs = jnp.asarray(np.random.default_rng(0).integers(2, 40, (3, 7)), jnp.int32).at[1, 5:].set(0)
    tokens = np.asarray(decoding.greedy_decode(cfg, params, inputs, max_decode_length=9, vocab_limit=30))
    assert tokens.shape == (3, 9) and tokens.max() < 30
    decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    logits = np.asarray(Transformer(cfg).apply({"params": params}, inputs, decoder_inputs))
    expected = logits[..., :30].argmax(-1)
    for row in range(3):
        ends = np.flatnonzero(tokens[row] == 1)
        stop = ends[0] + 1 if ends.size else 9
        np.testing.assert_array_equal(tokens[row, :stop], expected[row, :stop])
        assert (tokens[row, stop:] == 0).all(), "nothing after EOS"
