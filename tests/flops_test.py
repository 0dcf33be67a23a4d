"""The FLOP count from the config against XLA's own count of the compiled forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from t5x_lite import flops
from t5x_lite.network import Transformer, TransformerConfig
from tests.conftest import random_params


@pytest.mark.parametrize("activation", ["relu", "gated-gelu"])
def test_forward_flops_match_xla_cost_analysis(activation):
    cfg = TransformerConfig(
        vocab_size=512,
        d_model=64,
        num_heads=4,
        d_kv=32,
        d_ff=256,
        num_encoder_layers=2,
        num_decoder_layers=3,
        mlp_activation=activation,
        dropout_rate=0.0,
    )
    params = random_params(cfg)
    inputs, targets = jnp.ones((4, 48), jnp.int32), jnp.ones((4, 40), jnp.int32)
    compiled = (
        jax.jit(lambda p, e, d: Transformer(cfg).apply({"params": p}, e, d)).lower(params, inputs, targets).compile()
    )
    analysis = compiled.cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    ours = flops.forward_flops(cfg, 4, 48, 40)
    assert abs(ours - xla) / xla < 0.1, (ours, xla)
    assert flops.train_flops(cfg, 4, 48, 40) == 3 * ours


def test_peak_is_positive_and_explained():
    peak, how = flops.peak_flops_per_device()
    assert peak > 1e8 and how
