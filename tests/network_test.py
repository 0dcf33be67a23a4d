"""The Transformer as a whole: config validation, masking and packing, scan/remat, decode mode, dtypes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5x_lite import network
from t5x_lite.network import Transformer, TransformerConfig
from t5x_lite.presets import get_model_config
from tests.conftest import CLASSIC_POST_LN_SINUSOIDAL, random_params

SMALL = dict(
    vocab_size=60, d_model=16, num_heads=2, d_ff=24, num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0
)

# One config per family and position scheme; every masking property is checked on each.
FAMILIES = {
    "t5_v1_0": dict(SMALL, mlp_activation="relu"),
    "t5_v1_1": dict(
        SMALL, mlp_activation="gated-gelu", tie_word_embeddings=False, rescale_logits=False, num_heads=3, d_kv=5
    ),
    "classic_post_ln_sinusoidal": dict(SMALL, **CLASSIC_POST_LN_SINUSOIDAL),
    "classic_pre_ln_learned_unshared": dict(
        SMALL,
        norm_type="layernorm",
        position_embedding="learned",
        max_position_embeddings=32,
        scale_qk=True,
        share_embeddings=False,
        tie_word_embeddings=False,
        rescale_logits=False,
        use_bias=True,
    ),
}


def _setup(overrides, seed=0):
    cfg = TransformerConfig(**overrides)
    return cfg, random_params(cfg, seed)


@functools.cache
def _forward(cfg):
    return jax.jit(lambda params, *args: Transformer(cfg).apply({"params": params}, *args))


def _apply(cfg, params, *args):
    """Jit-compiled teacher-forced logits (eager flax dispatch would make the suite several times slower)."""
    return np.asarray(_forward(cfg)(params, *args))


def _tokens(shape, seed, vocab=60):
    return np.random.default_rng(seed).integers(2, vocab, shape).astype(np.int32)


# ----------------------------------------------------------------------------------------------- config errors


def test_heads_that_do_not_divide_d_model_name_the_field():
    with pytest.raises(ValueError, match=r"^TransformerConfig\.num_heads=7: does not divide d_model=512") as error:
        TransformerConfig(d_model=512, num_heads=7)
    assert "\n" not in str(error.value)
    # An explicit d_kv makes any head count valid (T5 v1.1 small has 6 heads of 64 over d_model 512).
    assert TransformerConfig(d_model=512, num_heads=6, d_kv=64).d_kv == 64


def test_unknown_activation_and_fields_name_the_field():
    with pytest.raises(ValueError, match=r"^TransformerConfig\.mlp_activation='swiglu': is unknown; choose one of"):
        TransformerConfig(mlp_activation="swiglu")
    with pytest.raises(ValueError, match=r"TransformerConfig\.norm_type='batchnorm'"):
        TransformerConfig(norm_type="batchnorm")
    with pytest.raises(ValueError, match=r"TransformerConfig\.d_model=0"):
        TransformerConfig(d_model=0)
    with pytest.raises(ValueError, match=r"TransformerConfig has no field 'hidden_size'"):
        TransformerConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ValueError, match="unknown model preset 't5_huge'"):
        get_model_config("t5_huge")


def test_config_round_trips_through_json():
    cfg = get_model_config("t5_v1_1_small", dropout_rate=0.0, scan_layers=True)
    import json

    assert TransformerConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert hash(cfg) == hash(TransformerConfig.from_dict(cfg.to_dict()))


def test_params_that_do_not_fit_the_config_name_the_field():
    cfg, params = _setup(FAMILIES["t5_v1_0"])
    with pytest.raises(ValueError, match=r"^TransformerConfig\.d_model=32 does not match the checkpoint: .* has shape"):
        network.check_params_match(cfg.replace(d_model=32), params)
    with pytest.raises(ValueError, match=r"^TransformerConfig\.d_ff=48 does not match"):
        network.check_params_match(cfg.replace(d_ff=48), params)
    with pytest.raises(ValueError, match=r"does not fit TransformerConfig: it lacks"):
        network.check_params_match(cfg.replace(mlp_activation="gated-relu"), params)


# ----------------------------------------------------------------------------------------------- structure


def test_parameter_names_follow_t5x():
    cfg = get_model_config("t5_tiny")
    names = {"/".join(k) for k in traverse_util.flatten_dict(nn.meta.unbox(network.abstract_params(cfg)))}
    for expected in [
        "token_embedder/embedding",
        "encoder/relpos_bias/rel_embedding",
        "encoder/layers_0/attention/query/kernel",
        "encoder/layers_1/pre_attention_layer_norm/scale",
        "encoder/layers_0/mlp/wi_0/kernel",
        "encoder/layers_0/mlp/wi_1/kernel",
        "encoder/layers_0/mlp/wo/kernel",
        "encoder/encoder_norm/scale",
        "decoder/relpos_bias/rel_embedding",
        "decoder/layers_0/self_attention/out/kernel",
        "decoder/layers_0/encoder_decoder_attention/key/kernel",
        "decoder/layers_0/pre_cross_attention_layer_norm/scale",
        "decoder/decoder_norm/scale",
        "decoder/logits_dense/kernel",
    ]:
        assert expected in names, expected
    assert not any("relpos" in n for n in names if "layers_" in n), "one relative-position table per stack"
    assert not any("encoder_decoder_attention" in n and "relpos" in n for n in names)


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    cfg = get_model_config("t5_tiny", scan_layers=scan)
    boxed = traverse_util.flatten_dict(network.abstract_params(cfg), is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    for name, value in boxed.items():
        assert isinstance(value, nn.Partitioned), name
        assert len(value.names) == len(value.value.shape), name
        assert all(isinstance(axis, str) for axis in value.names), name
        if scan and "layers" in name:
            assert value.names[0] == "layers", name
    specs = network.param_logical_axes(cfg)
    assert tuple(specs["token_embedder"]["embedding"]) == ("vocab", "embed")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_shapes_and_dtype(family):
    cfg, params = _setup(FAMILIES[family])
    logits = _apply(cfg, params, _tokens((3, 9), 0), _tokens((3, 7), 1))
    assert logits.shape == (3, 7, 60)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_classic_post_ln_has_no_final_norm_and_t5_has_no_biases():
    classic = nn.meta.unbox(network.abstract_params(TransformerConfig(**FAMILIES["classic_post_ln_sinusoidal"])))
    assert "encoder_norm" not in classic["encoder"]
    assert "post_attention_layer_norm" in classic["encoder"]["layers_0"]
    assert "bias" in classic["encoder"]["layers_0"]["attention"]["query"]
    assert "relpos_bias" not in classic["encoder"]
    t5 = traverse_util.flatten_dict(nn.meta.unbox(network.abstract_params(TransformerConfig(**FAMILIES["t5_v1_0"]))))
    assert not any(k[-1] == "bias" for k in t5)


# ----------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_never_influences_real_tokens(family):
    """Appending padding to inputs and targets leaves the logits of real positions unchanged."""
    cfg, params = _setup(FAMILIES[family])
    inputs, targets = _tokens((2, 6), 2), _tokens((2, 5), 3)
    base = _apply(cfg, params, inputs, targets, targets)
    padded_inputs = np.pad(inputs, [(0, 0), (0, 4)])
    padded_targets = np.pad(targets, [(0, 0), (0, 3)])
    padded = _apply(cfg, params, padded_inputs, padded_targets, padded_targets)
    np.testing.assert_allclose(padded[:, :5], base, rtol=1e-5, atol=1e-5)
    # Garbage in a padded slot of the decoder input cannot reach earlier positions (causality).
    noisy_targets = padded_targets.copy()
    noisy_targets[:, 5:] = 7
    noisy = _apply(cfg, params, padded_inputs, noisy_targets, padded_targets)
    np.testing.assert_allclose(noisy[:, :5], base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_is_causal(family):
    cfg, params = _setup(FAMILIES[family])
    inputs, targets = _tokens((2, 6), 4), _tokens((2, 8), 5)
    base = _apply(cfg, params, inputs, targets)
    changed = targets.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 58 + 2
    after = _apply(cfg, params, inputs, changed)
    np.testing.assert_allclose(after[:, :5], base[:, :5], rtol=1e-5, atol=1e-5)
    assert np.abs(after[:, 5:] - base[:, 5:]).max() > 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_examples_never_see_each_other(family):
    """Two examples packed in one row give the logits each gives alone."""
    cfg, params = _setup(FAMILIES[family])
    in_a, in_b = _tokens((1, 5), 6), _tokens((1, 4), 7)
    tg_a, tg_b = _tokens((1, 3), 8), _tokens((1, 4), 9)
    alone_a = _apply(cfg, params, in_a, tg_a, tg_a)
    alone_b = _apply(cfg, params, in_b, tg_b, tg_b)
    packed_in = np.concatenate([in_a, in_b, np.zeros((1, 2), np.int32)], 1)
    packed_tg = np.concatenate([tg_a, tg_b, np.zeros((1, 1), np.int32)], 1)
    enc_seg = np.array([[1] * 5 + [2] * 4 + [0] * 2])
    dec_seg = np.array([[1] * 3 + [2] * 4 + [0]])
    enc_pos = np.array([list(range(5)) + list(range(4)) + [0, 0]])
    dec_pos = np.array([list(range(3)) + list(range(4)) + [0]])
    packed = _apply(cfg, params, packed_in, packed_tg, packed_tg, enc_seg, dec_seg, enc_pos, dec_pos)
    np.testing.assert_allclose(packed[:, :3], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:7], alone_b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- scan, remat, dtype


@pytest.mark.parametrize("family", ["t5_v1_1", "classic_post_ln_sinusoidal"])
def test_scanned_equals_unscanned(family):
    cfg, params = _setup(FAMILIES[family])
    scanned_cfg = cfg.replace(scan_layers=True)
    scanned_params = network.scan_params(params, cfg)
    expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(network.abstract_params(scanned_cfg)))
    assert jax.tree.map(lambda x: x.shape, scanned_params) == expected
    inputs, targets = _tokens((2, 7), 10), _tokens((2, 6), 11)
    np.testing.assert_allclose(
        _apply(scanned_cfg, scanned_params, inputs, targets), _apply(cfg, params, inputs, targets), rtol=1e-5, atol=1e-5
    )
    round_trip = network.unscan_params(scanned_params, cfg)
    jax.tree.map(np.testing.assert_array_equal, round_trip, params)


@pytest.mark.parametrize(("policy", "scan"), [("minimal", False), ("full", True)])
def test_remat_changes_memory_not_results(policy, scan):
    cfg, params = _setup(FAMILIES["t5_v1_1"])
    inputs, targets = jnp.asarray(_tokens((2, 7), 12)), jnp.asarray(_tokens((2, 6), 13))
    plain_cfg = cfg.replace(scan_layers=scan)
    params = network.scan_params(params, cfg) if scan else params

    def grads(cfg):
        loss = lambda p: jnp.mean(Transformer(cfg).apply({"params": p}, inputs, targets) ** 2)
        return jax.jit(jax.grad(loss))(params)

    g_plain, g_remat = grads(plain_cfg), grads(plain_cfg.replace(remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_remat, g_plain)


def test_bfloat16_activations_with_float32_parameters():
    cfg, params = _setup(FAMILIES["t5_v1_1"])
    bf16_cfg = cfg.replace(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(network.abstract_params(bf16_cfg))))
    inputs, targets = _tokens((2, 7), 14), _tokens((2, 6), 15)
    full = _apply(cfg, params, inputs, targets)
    half = _apply(bf16_cfg, params, inputs, targets)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert np.abs(half - full).max() < 0.1 * np.abs(full).max()
    grads = jax.jit(jax.grad(lambda p: jnp.sum(Transformer(bf16_cfg).apply({"params": p}, inputs, targets))))(params)
    assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_bfloat16_parameters():
    cfg = TransformerConfig(**FAMILIES["t5_v1_0"], dtype="bfloat16", param_dtype="bfloat16")
    params = network.init_params(cfg, jax.random.key(0))  # the one real (compiled) initialization of the suite
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert np.isfinite(_apply(cfg, params, _tokens((1, 4), 1), _tokens((1, 3), 2))).all()


def test_dropout_is_active_only_when_enabled_and_seeded():
    cfg, params = _setup(dict(FAMILIES["t5_v1_0"], dropout_rate=0.3))
    inputs, targets = _tokens((2, 7), 16), _tokens((2, 6), 17)
    model = Transformer(cfg)
    off = _apply(cfg, params, inputs, targets)

    @jax.jit
    def with_dropout(key):
        return model.apply({"params": params}, inputs, targets, enable_dropout=True, rngs={"dropout": key})

    on_a, on_b, on_c = (with_dropout(jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(on_a, on_b)
    assert np.abs(on_a - off).max() > 1e-3 and np.abs(on_a - on_c).max() > 1e-3


# ----------------------------------------------------------------------------------------------- decode mode


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_step_by_step_equals_full_pass(family, scan):
    cfg, params = _setup(FAMILIES[family])
    if scan:
        params, cfg = network.scan_params(params, cfg), cfg.replace(scan_layers=True)
    inputs = _tokens((3, 9), 18)
    inputs[1, 6:] = 0  # a padded row: the cache must respect the encoder mask too
    targets = _tokens((3, 7), 19)
    targets[:, 0] = 0
    full = _apply(cfg, params, inputs, targets)
    model = Transformer(cfg)
    encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Transformer.encode))(params, inputs)
    cache = network.init_decode_cache(cfg, params, encoded, inputs, max_decode_length=10)
    step = jax.jit(lambda c, t: network.decode_step(cfg, params, c, encoded, inputs, t))
    for position in range(targets.shape[1]):
        logits, cache = step(cache, targets[:, position])
        np.testing.assert_allclose(logits, full[:, position], rtol=1e-4, atol=1e-4)
    assert int(cache["decoder"]["cache_index"]) == targets.shape[1]


def test_preset_parameter_counts_of_classic_models():
    # Vaswani et al. (2017) Table 3 report 65M (base) and 213M (big) parameters with a 37k shared vocabulary.
    base = network.count_params(get_model_config("transformer_base", vocab_size=37000))
    big = network.count_params(get_model_config("transformer_big", vocab_size=37000))
    assert 60e6 < base < 66e6, base
    assert 205e6 < big < 215e6, big


# ----------------------------------------------------------------------------------------------- attention kernels


def _ragged_batch(seed):
    """Rows of different real lengths, right-padded, and one all-padding row (as fills a last eval batch): the fused
    kernels see the padding as lengths."""
    inputs, targets = _tokens((4, 9), seed), _tokens((4, 7), seed + 1)
    for row, (input_len, target_len) in enumerate([(9, 7), (5, 4), (2, 1), (0, 0)]):
        inputs[row, input_len:] = 0
        targets[row, target_len:] = 0
    return jnp.asarray(inputs), jnp.asarray(targets)


@pytest.mark.parametrize(("family", "scan"), [("t5_v1_1", False), ("t5_v1_0", True)])
def test_fused_attention_kernel_equals_einsum(family, scan):
    """jax.nn.dot_product_attention (the "xla" kernel: the call that "cudnn" makes, with padding as lengths and the
    relative-position bias alone as its bias) gives the einsum path's logits and gradients on every real token."""
    cfg, params = _setup(dict(FAMILIES[family], scan_layers=scan))
    inputs, targets = _ragged_batch(30)
    weights = (targets > 0).astype(jnp.float32)[..., None]

    def logits_and_grads(kernel):
        model = Transformer(cfg.replace(attention_kernel=kernel))
        logits = lambda p: model.apply({"params": p}, inputs, targets, targets)
        loss = lambda p: jnp.sum(jax.nn.log_softmax(logits(p)) * weights) / weights.sum()
        return jax.jit(lambda p: (logits(p) * weights, jax.grad(loss)(p)))(params)

    (einsum_logits, einsum_grads), (fused_logits, fused_grads) = logits_and_grads("einsum"), logits_and_grads("xla")
    np.testing.assert_allclose(fused_logits, einsum_logits, rtol=1e-5, atol=1e-5)
    assert np.isfinite(fused_logits).all()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), fused_grads, einsum_grads)
    if family.startswith("t5"):  # the relative-position table gets its gradient through the kernel's bias
        relpos = [g for path, g in traverse_util.flatten_dict(fused_grads).items() if "relpos_bias" in path]
        assert relpos and all(np.abs(g).max() > 0 for g in relpos)


def test_fused_attention_kernel_in_bfloat16_stays_close_to_einsum():
    cfg, params = _setup(FAMILIES["t5_v1_1"])
    inputs, targets = _ragged_batch(31)
    outputs = {
        kernel: _apply(cfg.replace(dtype="bfloat16", attention_kernel=kernel), params, inputs, targets, targets)
        for kernel in ("einsum", "xla")
    }
    real = np.asarray(targets > 0)
    np.testing.assert_allclose(outputs["xla"][real], outputs["einsum"][real], atol=0.1)


def test_fused_attention_kernel_refuses_packed_batches():
    cfg, params = _setup(dict(FAMILIES["t5_v1_1"], attention_kernel="xla"))
    inputs, targets = _tokens((1, 6), 32), _tokens((1, 4), 33)
    segments = np.array([[1, 1, 1, 2, 2, 2]]), np.array([[1, 1, 2, 2]])
    with pytest.raises(ValueError, match="packed.*attention_kernel='einsum'"):
        Transformer(cfg).apply({"params": params}, inputs, targets, targets, *segments)


def test_fused_attention_kernel_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"attention_kernel.*no attention dropout.*dropout_rate=0"):
        TransformerConfig(**dict(SMALL, dropout_rate=0.1, attention_kernel="xla"))
    with pytest.raises(ValueError, match=r"attention_kernel.*dtype='bfloat16'"):
        TransformerConfig(**dict(SMALL, attention_kernel="cudnn"))
    with pytest.raises(ValueError, match=r"attention_kernel.*choose one of einsum, xla, cudnn"):
        TransformerConfig(**dict(SMALL, attention_kernel="flash"))
    with pytest.raises(ValueError, match=r"attention_kernel.*d_kv a multiple of 8 up to 256, not 5"):
        TransformerConfig(**dict(FAMILIES["t5_v1_1"], dtype="bfloat16", attention_kernel="cudnn"))


def test_cudnn_kernel_refuses_odd_lengths_with_a_position_bias():
    """cuDNN trains a biased attention on even lengths only; the error comes before any kernel is asked for."""
    cfg, params = _setup(dict(FAMILIES["t5_v1_0"], d_kv=8, dtype="bfloat16", attention_kernel="cudnn"))
    inputs, targets = _tokens((2, 7), 34), _tokens((2, 4), 35)
    with pytest.raises(ValueError, match=r"needs even lengths, not 7 queries x 7 keys; pad the batch"):
        Transformer(cfg).apply({"params": params}, inputs, targets, targets)


# ----------------------------------------------------------------------------------------------- dropout placement


def test_dropout_rates_default_to_dropout_rate_and_are_validated():
    t5 = TransformerConfig(**{**SMALL, "dropout_rate": 0.1})
    assert (t5.attention_dropout, t5.activation_dropout, t5.uses_dropout) == (0.1, 0.1, True)
    classic = get_model_config("transformer_tiny")
    assert (classic.dropout_rate, classic.attention_dropout, classic.activation_dropout) == (0.3, 0.0, 0.0)
    only_attention = TransformerConfig(**SMALL, attention_dropout_rate=0.2)
    assert only_attention.uses_dropout and only_attention.activation_dropout == 0.0
    with pytest.raises(ValueError, match=r"attention_dropout_rate=1.5: must be in \[0, 1\) or None"):
        TransformerConfig(**SMALL, attention_dropout_rate=1.5)
    with pytest.raises(ValueError, match="dropout_generator='mt19937': is unknown"):
        TransformerConfig(**SMALL, dropout_generator="mt19937")


@pytest.mark.parametrize("generator", ["threefry", "hash"])
def test_residual_only_dropout_draws_fewer_masks_and_each_generator_is_seeded(generator):
    """fairseq's placement (attention and activation dropout 0) leaves attention weights and MLP activations alone:
    with dropout on only there, the model is deterministic; with residual dropout it depends on the key only."""
    base = dict(FAMILIES["classic_post_ln_sinusoidal"], dropout_generator=generator)
    inputs, targets = _tokens((2, 7), 16), _tokens((2, 6), 17)

    def logits(overrides, key):
        cfg = TransformerConfig(**{**base, **overrides})
        params = random_params(cfg)
        apply = jax.jit(
            lambda k: Transformer(cfg).apply(
                {"params": params}, inputs, targets, enable_dropout=True, rngs={"dropout": k}
            )
        )
        return np.asarray(apply(jax.random.key(key)))

    inner_only = dict(dropout_rate=0.0, attention_dropout_rate=0.0, activation_dropout_rate=0.0)
    off = logits(inner_only, 1)
    residual = dict(dropout_rate=0.3, attention_dropout_rate=0.0, activation_dropout_rate=0.0)
    a, b, c = logits(residual, 1), logits(residual, 1), logits(residual, 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - off).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    attention = dict(dropout_rate=0.0, attention_dropout_rate=0.5, activation_dropout_rate=0.0)
    assert np.abs(logits(attention, 1) - off).max() > 1e-3


def test_return_hidden_and_output_projection_give_the_logits():
    for family in ("t5_v1_0", "t5_v1_1", "classic_pre_ln_learned_unshared"):
        cfg, params = _setup(FAMILIES[family])
        inputs, targets = _tokens((2, 5), 1), _tokens((2, 4), 2)
        model = Transformer(cfg)
        hidden = model.apply({"params": params}, inputs, targets, return_hidden=True)
        logits = _apply(cfg, params, inputs, targets)
        projected = np.einsum("bld,dv->blv", hidden, network.output_projection(cfg, params))
        np.testing.assert_allclose(projected, logits, rtol=1e-5, atol=1e-5, err_msg=family)


# ------------------------------------------------------------------------------------------ initialization


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / a.size, np.searchsorted(b, grid, "right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


@pytest.mark.parametrize("family", ["t5_v1_1", "classic_post_ln_sinusoidal"])
def test_init_through_scan_draws_the_same_distributions(family):
    """``init_through_scan`` gives other values than the per-layer initializers but from the same distribution:
    per parameter (pooled over the layers) the same scale and a small two-sample KS distance; the layers differ
    from each other; everything outside the layers is unchanged."""
    overrides = dict(FAMILIES[family], d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=64)
    overrides.update(num_encoder_layers=6, num_decoder_layers=6, use_bias=False)
    cfg = TransformerConfig(**overrides)
    rng = jax.random.key(7)
    plain = traverse_util.flatten_dict(jax.device_get(network.init_params(cfg, rng)))
    fast = traverse_util.flatten_dict(jax.device_get(network.init_params(cfg.replace(init_through_scan=True), rng)))
    assert plain.keys() == fast.keys()
    pooled: dict[tuple, list] = {}
    for path, value in plain.items():
        assert fast[path].shape == value.shape, path
        layer = next((p for p in path if p.startswith("layers_")), None)
        if layer is None:
            np.testing.assert_array_equal(fast[path], value, err_msg=f"{path} is outside the layers")
            continue
        kind = tuple(p for p in path if p != layer)
        pooled.setdefault(kind, []).append((value, fast[path]))
    random_kinds = 0
    for kind, pairs in pooled.items():
        old = np.concatenate([v.ravel() for v, _ in pairs])
        new = np.concatenate([v.ravel() for _, v in pairs])
        if old.std() == 0:  # constant initializers (norm scales): identical
            np.testing.assert_array_equal(new, old, err_msg=str(kind))
            continue
        random_kinds += 1
        assert not np.array_equal(pairs[0][1], pairs[1][1]), f"{kind}: layers 0 and 1 drew the same values"
        assert abs(new.std() / old.std() - 1) < 0.05, kind
        assert abs(new.mean() - old.mean()) < 0.05 * old.std(), kind
        assert _ks_distance(old, new) < 3.0 * np.sqrt(2.0 / old.size), kind  # far beyond the 0.1% critical value
    assert random_kinds >= 6
