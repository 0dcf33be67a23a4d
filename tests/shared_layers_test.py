"""Parameter sharing across layers (``TransformerConfig.share_layers``): one layer per stack, applied by nn.scan
to every depth; the same function as an unshared stack of copies; cached decoding and training work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, network, quantize, train
from t5x_lite.network import Transformer, TransformerConfig
from tests import tiny_config

BASE = TransformerConfig(
    vocab_size=64,
    d_model=32,
    num_heads=4,
    d_ff=64,
    num_encoder_layers=3,
    num_decoder_layers=2,
    dropout_rate=0.0,
    scan_layers=True,
)
SHARED = BASE.replace(share_layers=True)


def _tokens(seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (2, 7), 2, BASE.vocab_size)


def test_one_layer_per_stack():
    one_layer = BASE.replace(num_encoder_layers=1, num_decoder_layers=1, scan_layers=False)
    assert network.count_params(SHARED) == network.count_params(one_layer) < network.count_params(BASE)
    params = network.init_params(SHARED, jax.random.key(0))
    kernel = params["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert kernel.shape == (32, 4, 8)  # no leading layer axis


def test_shared_stack_equals_a_stack_of_copies():
    params = network.init_params(SHARED, jax.random.key(0))
    tiled = dict(params)
    for stack, depth in (("encoder", BASE.num_encoder_layers), ("decoder", BASE.num_decoder_layers)):
        tiled[stack] = dict(params[stack])
        tiled[stack]["layers"] = jax.tree.map(lambda x, n=depth: jnp.stack([x] * n), params[stack]["layers"])
    encoder, decoder = _tokens(1), _tokens(2)
    shared = Transformer(SHARED).apply({"params": params}, encoder, decoder)
    copies = Transformer(BASE).apply({"params": tiled}, encoder, decoder)
    np.testing.assert_allclose(shared, copies, atol=1e-5)
    # Depth matters: the same layer applied 3 times is not the same as once.
    once = Transformer(SHARED.replace(num_encoder_layers=1)).apply({"params": params}, encoder, decoder)
    assert float(jnp.max(jnp.abs(once - shared))) > 1e-3


def test_cached_decoding_matches_teacher_forcing():
    params = network.init_params(SHARED, jax.random.key(3))
    encoder = _tokens(4)
    tokens, _ = models.predict_batch(SHARED, params, encoder, max_decode_length=6)
    decoder_inputs = jnp.concatenate([jnp.zeros((2, 1), tokens.dtype), tokens[:, :-1]], axis=1)
    greedy = jnp.argmax(Transformer(SHARED).apply({"params": params}, encoder, decoder_inputs), axis=-1)
    alive = jnp.cumsum(tokens == 1, axis=1) - (tokens == 1) == 0
    np.testing.assert_array_equal(np.where(alive, greedy, 0), np.where(alive, tokens, 0))


def test_bad_configs_and_layout_conversions():
    with pytest.raises(ValueError, match="share_layers=True: needs scan_layers=True"):
        BASE.replace(scan_layers=False, share_layers=True)
    params = network.init_params(SHARED, jax.random.key(0))
    with pytest.raises(ValueError, match="one layer per stack, not a per-layer layout"):
        network.unscan_params(params, SHARED)


def test_training_a_shared_model(tmp_path):
    config = tiny_config.get_config("steps=6")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.model_overrides.update(share_layers=True, num_encoder_layers=3, num_decoder_layers=3)
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(final["eval/loss"])
    with pytest.raises(ValueError, match="share_layers"):
        quantize.quantize_workdir(str(tmp_path / "run"), str(tmp_path / "q"), "int8")
