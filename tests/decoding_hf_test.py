"""Greedy decoding of converted random Hugging Face T5 models is token-identical to ``transformers`` generate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import convert, decoding
from tests.convert_test import HF_CONFIGS, _hf_model

torch = pytest.importorskip("torch")

NEW_TOKENS = 20


def _boost_eos(model, factor: float) -> None:
    """Scale the EOS output row so that some generations stop early and others run to the length limit."""
    with torch.no_grad():
        model.lm_head.weight[1] *= factor  # the shared embedding when tied


@pytest.mark.parametrize(
    ("name", "eos_factor"), [("v1_0_relu_tied", -6.0), ("v1_1_gated_gelu_untied", -3.0), ("v1_1_odd_heads_dkv", -3.0)]
)
def test_greedy_equals_transformers_generate(name, eos_factor):
    model, hf_config = _hf_model(HF_CONFIGS[name], seed=11)
    _boost_eos(model, eos_factor)
    cfg, params = convert.params_from_hf(model.state_dict(), hf_config)
    rng = np.random.default_rng(12)
    inputs = rng.integers(2, cfg.vocab_size, (32, 19))
    for row, length in enumerate(rng.integers(3, 19, 32)):
        inputs[row, length:] = 0
        inputs[row, length - 1] = 1  # EOS-terminated and padded, as the data pipeline makes them
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor(inputs),
            attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
            do_sample=False,
            num_beams=1,
            max_new_tokens=NEW_TOKENS,
            decoder_start_token_id=0,  # T5's start token is the padding id
            eos_token_id=1,
            pad_token_id=0,
        ).numpy()[:, 1:]  # drop the decoder start token
    expected = np.zeros((32, NEW_TOKENS), np.int64)
    expected[:, : generated.shape[1]] = generated
    tokens, _ = decoding.greedy_decode(cfg, params, jnp.asarray(inputs, jnp.int32), max_decode_length=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    ended = (expected == 1).any(axis=1).sum()
    assert 0 < ended < 32, f"{ended} of 32 rows ended with EOS: the test should see both kinds"
