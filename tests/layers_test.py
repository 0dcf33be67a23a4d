"""Each building block of layers.py against a NumPy (or PyTorch) reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers


def _init_apply(module, *args, **kwargs):
    variables = module.init(jax.random.key(0), *args, **kwargs)
    return variables, module.apply(variables, *args, **kwargs)


def test_dense_general_matches_einsum_and_names_axes():
    x = jax.random.normal(jax.random.key(1), (2, 5, 6))
    module = layers.DenseGeneral(features=(3, 4), kernel_axes=("embed", "heads", "kv"), use_bias=True)
    variables, y = _init_apply(module, x)
    kernel = variables["params"]["kernel"]
    assert kernel.names == ("embed", "heads", "kv")
    assert variables["params"]["bias"].names == ("heads", "kv")
    expected = np.einsum("bld,dhk->blhk", x, kernel.value) + variables["params"]["bias"].value
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dense_general_contracts_several_axes():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
    module = layers.DenseGeneral(features=6, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"))
    variables, y = _init_apply(module, x)
    expected = np.einsum("blhk,hkd->bld", x, variables["params"]["kernel"].value)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_reference_and_keeps_float32_statistics():
    x = jax.random.normal(jax.random.key(2), (3, 7)) * 5 + 1
    variables, y = _init_apply(layers.RMSNorm(epsilon=1e-6), x)
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    assert "bias" not in variables["params"]
    _, y16 = _init_apply(layers.RMSNorm(dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_layer_norm_matches_reference():
    x = jax.random.normal(jax.random.key(3), (3, 7)) * 2 + 4
    variables, y = _init_apply(layers.LayerNorm(epsilon=1e-5), x)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert set(variables["params"]) == {"scale", "bias"}


def test_embed_lookup_and_attend_are_transposes():
    module = layers.Embed(num_embeddings=11, features=4)
    ids = jnp.array([[1, 2, 10]])
    variables, y = _init_apply(module, ids)
    table = variables["params"]["embedding"].value
    np.testing.assert_array_equal(y, table[np.array([[1, 2, 10]])])
    logits = module.apply(variables, y, method=layers.Embed.attend)
    np.testing.assert_allclose(logits, np.asarray(y) @ np.asarray(table).T, rtol=1e-5)
    with pytest.raises(ValueError, match="integer ids"):
        module.apply(variables, jnp.ones((1, 2), jnp.float32))


def test_trainable_rows_act_as_the_changed_table_in_lookups_logits_and_gradients():
    """Embed adds the ``lora_rows`` changes without building a whole changed table; it must compute what
    ``embedding + row_changes(delta)`` computes, gradients with respect to the changes included."""
    rows = (9, 0, 5)
    module = layers.Embed(num_embeddings=11, features=4, lora_rows=rows)
    ids = jnp.array([[0, 1, 5, 9, 9, 10]])
    variables = nn.meta.unbox(module.init(jax.random.key(0), ids))
    delta = jax.random.normal(jax.random.key(1), (3, 4))
    query = jax.random.normal(jax.random.key(2), (2, 5, 4))

    def embed_and_logits(delta):
        params = {"params": {**variables["params"], "embedding_lora_rows": delta}}
        return module.apply(params, ids), module.apply(params, query, method=layers.Embed.attend)

    def reference(delta):
        table = variables["params"]["embedding"] + layers.row_changes(delta, rows, 11)
        return table[ids], query @ table.T

    for got, want in zip(embed_and_logits(delta), reference(delta), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(11), rows)  # columns of rows that lora_rows does not name: the table's own
    np.testing.assert_array_equal(
        embed_and_logits(delta)[1][..., untouched], embed_and_logits(jnp.zeros_like(delta))[1][..., untouched]
    )

    def scalar(fn):
        return lambda d: sum(jnp.sum(jnp.sin(out)) for out in fn(d))

    np.testing.assert_allclose(
        jax.grad(scalar(embed_and_logits))(delta), jax.grad(scalar(reference))(delta), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 20), (10, 9), (64, 300)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 701)[None, :]
    expected = T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    ours = layers.relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, expected)
    assert ours.min() >= 0 and ours.max() < num_buckets


def test_relative_position_biases_decode_row_equals_full_matrix():
    module = layers.RelativePositionBiases(num_buckets=8, max_distance=12, num_heads=3, bidirectional=False)
    variables, full = _init_apply(module, 20, 20)
    assert full.shape == (1, 3, 20, 20)
    assert variables["params"]["rel_embedding"].names == ("heads", "relpos_buckets")
    for index in (0, 7, 19):
        row = module.apply(variables, jnp.array([index]), 20)
        np.testing.assert_array_equal(row[0, :, 0], full[0, :, index])


def test_sinusoidal_positions():
    encoding = layers.sinusoidal_positions(jnp.arange(50)[None], 16)
    assert encoding.shape == (1, 50, 16)
    np.testing.assert_allclose(encoding[0, :, 0], np.sin(np.arange(50)), atol=1e-5)
    np.testing.assert_allclose(encoding[0, :, 8], np.cos(np.arange(50)), atol=1e-5)
    np.testing.assert_allclose(encoding[0, 3, 1], np.sin(3 * 10_000 ** (-2 / 16)), atol=1e-5)
    assert layers.sinusoidal_positions(jnp.arange(4)[None], 7).shape == (1, 4, 7)


def test_attention_mask_bias_padding_segments_and_causality():
    valid = jnp.array([[True, True, True, False]])
    segments = jnp.array([[1, 1, 2, 0]])
    bias = np.asarray(layers.attention_mask_bias(valid, valid, segments, segments, causal=True))[0, 0]
    allowed = bias == 0
    expected = np.array(
        [
            [1, 0, 0, 0],  # causal: only itself
            [1, 1, 0, 0],
            [0, 0, 1, 0],  # segment 2 never sees segment 1
            [0, 0, 0, 0],  # padding query sees nothing
        ],
        bool,
    )
    np.testing.assert_array_equal(allowed, expected)
    assert bias.min() == layers.NEG_INF


def test_attention_ignores_masked_keys():
    x = jax.random.normal(jax.random.key(4), (1, 4, 8))
    module = layers.MultiHeadAttention(num_heads=2, d_kv=3)
    valid = jnp.array([[True, True, False, False]])
    bias = layers.attention_mask_bias(valid, valid)
    variables, y = _init_apply(module, x, x, bias)
    x_changed = x.at[:, 2:].set(100.0)  # only the masked keys change
    y_changed = module.apply(variables, x, x_changed, bias)
    np.testing.assert_allclose(y[:, :2], y_changed[:, :2], rtol=1e-6)


def test_attention_decode_cache_equals_full_pass():
    x = jax.random.normal(jax.random.key(5), (2, 6, 8))
    module = layers.MultiHeadAttention(num_heads=2, d_kv=5)
    causal = layers.attention_mask_bias(jnp.ones((2, 6), bool), jnp.ones((2, 6), bool), causal=True)
    variables = module.init(jax.random.key(0), x, x, causal)
    full = module.apply(variables, x, x, causal)
    _, state = module.apply(variables, x, x, causal, decode=True, mutable=["cache"])
    cache = state["cache"]
    assert cache["cached_key"].shape == (2, 2, 5, 6)  # head-major: [batch, heads, d_kv, length]
    assert cache["cached_value"].shape == (2, 2, 6, 5)  # [batch, heads, length, d_kv]
    for t in range(6):
        row_bias = jnp.where(jnp.arange(6) <= t, 0.0, layers.NEG_INF)[None, None, None]
        out, state = module.apply(
            {**variables, "cache": cache},
            x[:, t : t + 1],
            x[:, t : t + 1],
            row_bias,
            decode=True,
            decode_index=t,
            mutable=["cache"],
        )
        cache = state["cache"]
        np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_exact", "silu", "gated-gelu", "gated-silu"])
def test_mlp_block_matches_numpy(activation):
    x = jax.random.normal(jax.random.key(6), (2, 3, 8))
    module = layers.MlpBlock(d_ff=16, activation=activation)
    variables, y = _init_apply(module, x)
    p = {k: v["kernel"].value for k, v in variables["params"].items()}
    act = {
        "relu": lambda h: np.maximum(h, 0),
        "gelu": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        "gelu_exact": lambda h: np.asarray(jax.nn.gelu(h, approximate=False)),
        "silu": lambda h: h / (1 + np.exp(-h)),
    }[activation.removeprefix("gated-")]
    x = np.asarray(x)
    if activation.startswith("gated-"):
        assert set(p) == {"wi_0", "wi_1", "wo"}
        hidden = act(x @ p["wi_0"]) * (x @ p["wi_1"])
    else:
        assert set(p) == {"wi", "wo"}
        hidden = act(x @ p["wi"])
    np.testing.assert_allclose(y, hidden @ p["wo"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- dropout bits


def test_hash_bits_are_uniform_and_keyed():
    shape = (256, 512)
    key = jax.random.key(3)
    bits = np.asarray(layers.hash_bits(key, shape))
    again = np.asarray(layers.hash_bits(key, shape))
    other = np.asarray(layers.hash_bits(jax.random.key(4), shape))
    np.testing.assert_array_equal(bits, again)
    assert np.mean(bits == other) < 1e-3
    bound = 4.5 / np.sqrt(bits.size)  # 4.5 standard deviations of a correlation between independent samples

    def correlation(a, b):
        return abs(np.corrcoef(a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64))[0, 1])

    for word in (bits, other):
        # each of the 32 bits is set half the time, and neighbours (in a row, across rows) do not correlate
        ones = np.unpackbits(word.view(np.uint8)).reshape(-1, 32).mean(axis=0)
        assert np.abs(ones - 0.5).max() < 0.01
        flat = word.reshape(-1)
        assert correlation(flat[:-1], flat[1:]) < bound and correlation(flat[:-2], flat[2:]) < bound
        assert correlation(word[:-1], word[1:]) < bound
    assert correlation(bits, other) < bound


def test_hash_bits_are_a_function_of_the_index_not_the_shape_of_the_call():
    key = jax.random.key(5)
    whole = np.asarray(layers.hash_bits(key, (4, 6, 8)))
    flat = np.asarray(layers.hash_bits(key, (4 * 6 * 8,)))
    np.testing.assert_array_equal(whole.reshape(-1), flat)


@pytest.mark.parametrize("generator", layers.DROPOUT_GENERATORS)
def test_dropout_keeps_the_expected_fraction_and_scales(generator):
    x = jnp.ones((200, 100))
    module = layers.Dropout(rate=0.3, generator=generator)
    y = np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)


def test_threefry_dropout_equals_flax_dropout():
    x = jax.random.normal(jax.random.key(1), (8, 16))
    rngs = {"dropout": jax.random.key(2)}
    ours = layers.Dropout(rate=0.25).apply({}, x, deterministic=False, rngs=rngs)
    flax_dropout = nn.Dropout(rate=0.25).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(ours, flax_dropout)


def test_unknown_dropout_generator_is_named():
    with pytest.raises(ValueError, match="dropout generator 'philox' is unknown"):
        layers.Dropout(rate=0.1, generator="philox").apply(
            {}, jnp.ones(4), deterministic=False, rngs={"dropout": jax.random.key(0)}
        )


def test_sinusoidal_table_equals_the_formula():
    table = layers.sinusoidal_table(50, 17)
    np.testing.assert_allclose(table, np.asarray(layers.sinusoidal_positions(jnp.arange(50), 17)), atol=2e-5)
    assert not table.flags.writeable
