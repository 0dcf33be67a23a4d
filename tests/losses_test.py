"""Cross entropy, label smoothing, z-loss and normalization against a NumPy reference.

Every case runs at one shape through one jitted function (``all_sums``) that evaluates all the (label_smoothing,
z_loss) settings at once: a handful of compilations in total, where op-by-op execution would compile each primitive
for each shape (seconds on 2 cores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import losses

BATCH, LENGTH, VOCAB = 2, 5, 11
SETTINGS = ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2))  # (label_smoothing, z_loss)


@jax.jit
def all_sums(logits, targets, weights):
    """``cross_entropy`` for every entry of SETTINGS, keyed by the setting."""
    return {(ls, z): losses.cross_entropy(logits, targets, weights, label_smoothing=ls, z_loss=z) for ls, z in SETTINGS}


def reference(logits, targets, weights, label_smoothing=0.0, z_loss=0.0):
    """T5X's compute_weighted_cross_entropy, written out in NumPy (float64) with explicit soft targets."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[-1]
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    log_probs = logits - log_z[..., None]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
    constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    token_z = z_loss * log_z**2
    token_loss = -(soft * log_probs).sum(-1) - constant + token_z
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    return {
        "loss": (token_loss * weights).sum(),
        "z_loss": (token_z * weights).sum(),
        "weight_sum": weights.sum(),
        "correct": (correct * weights).sum(),
    }


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((BATCH, LENGTH, VOCAB))).astype(np.float32)
    targets = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    targets[0, 3:] = 0  # padding at the end of row 0
    for b, t in ((0, 0), (1, 0), (1, 1)):  # some correct predictions
        logits[b, t, targets[b, t]] += 10.0
    weights = (targets > 0).astype(np.float32)
    return logits, targets, weights


def test_matches_numpy_reference(batch):
    logits, targets, weights = batch
    got = all_sums(logits, targets, weights)
    for (ls, z), sums in got.items():
        want = reference(logits, targets, weights, ls, z)
        assert set(sums) == set(want)
        for key in want:
            np.testing.assert_allclose(float(sums[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} {ls} {z}")
    assert float(got[0.0, 0.0]["correct"]) == 3.0


def test_no_weights_counts_every_token(batch):
    logits, targets, _ = batch
    got = jax.jit(losses.cross_entropy)(logits, targets)
    want = reference(logits, targets, np.ones(targets.shape))
    np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)
    assert float(got["weight_sum"]) == BATCH * LENGTH


def test_perfect_prediction_is_zero(batch):
    _, targets, weights = batch
    # Logits that are the log of the smoothed target distribution (0.9 on the target, 0.1 / (vocab - 1) elsewhere).
    probs = np.full((BATCH, LENGTH, VOCAB), 0.1 / (VOCAB - 1))
    np.put_along_axis(probs, targets[..., None], 0.9, axis=-1)
    assert abs(float(all_sums(np.log(probs), targets, weights)[0.1, 0.0]["loss"])) < 1e-5
    # Without smoothing, near-one-hot logits: loss ~0 as well.
    onehot = 50.0 * np.eye(VOCAB, dtype=np.float32)[targets]
    assert abs(float(all_sums(onehot, targets, weights)[0.0, 0.0]["loss"])) < 1e-5


def test_z_loss_value(batch):
    _, targets, weights = batch
    got = all_sums(np.zeros((BATCH, LENGTH, VOCAB), np.float32), targets, weights)  # log Z = log(vocab) everywhere
    for z in (1e-4, 1e-2):
        ls = 0.0 if z == 1e-4 else 0.2
        np.testing.assert_allclose(float(got[ls, z]["z_loss"]), z * np.log(VOCAB) ** 2 * weights.sum(), rtol=1e-6)
    added = float(got[0.0, 1e-4]["loss"] - got[0.0, 0.0]["loss"])
    np.testing.assert_allclose(added, 1e-4 * np.log(VOCAB) ** 2 * weights.sum(), atol=2e-5)  # float32 difference
    assert float(got[0.0, 0.0]["z_loss"]) == 0.0


def test_weight_zero_positions_change_nothing(batch):
    logits, targets, weights = batch
    other = logits.copy()
    other[weights == 0] = 100.0 * np.random.default_rng(1).standard_normal(other[weights == 0].shape)
    other_targets = np.where(weights > 0, targets, 5)  # a different id at padded positions as well
    a, b = all_sums(logits, targets, weights), all_sums(other, other_targets, weights)
    for setting in SETTINGS:
        for key in a[setting]:
            assert float(a[setting][key]) == pytest.approx(float(b[setting][key]), rel=1e-6), (setting, key)


def test_gradients_finite_and_masked(batch):
    logits, targets, weights = batch
    logits = logits.copy()
    logits[0, 1] = [1e4, -1e4, 0.0, 3e3] + [0.0] * (VOCAB - 4)  # extreme but finite logits stay finite

    @jax.jit
    def grad(logits):
        return jax.grad(lambda x: losses.cross_entropy(x, targets, weights, label_smoothing=0.1, z_loss=1e-4)["loss"])(
            logits
        )

    g = np.asarray(grad(logits))
    assert np.all(np.isfinite(g))
    assert np.all(g[weights == 0] == 0.0)
    assert np.all(np.abs(g[weights > 0]).sum(-1) > 0)


def test_normalizations(batch):
    logits, targets, weights = batch
    sums = all_sums(logits, targets, weights)[0.0, 1e-4]
    want = reference(logits, targets, weights, z_loss=1e-4)
    by_tokens = losses.normalize(sums, "num_real_target_tokens")
    np.testing.assert_allclose(float(by_tokens["loss"]), want["loss"] / want["weight_sum"], rtol=1e-5)
    np.testing.assert_allclose(float(by_tokens["z_loss"]), want["z_loss"] / want["weight_sum"], rtol=1e-5)
    np.testing.assert_allclose(float(by_tokens["accuracy"]), want["correct"] / want["weight_sum"], rtol=1e-6)
    factor = float(BATCH * LENGTH)
    by_constant = losses.normalize(sums, factor)
    np.testing.assert_allclose(float(by_constant["loss"]), want["loss"] / factor, rtol=1e-5)
    np.testing.assert_allclose(float(by_constant["z_loss"]), want["z_loss"] / factor, rtol=1e-5)
    np.testing.assert_allclose(float(by_constant["accuracy"]), want["correct"] / want["weight_sum"], rtol=1e-6)


def test_sums_add_over_rows(batch):
    """Sums of microbatches equal the sums of the whole batch: what gradient accumulation relies on."""
    logits, targets, weights = batch
    whole = all_sums(logits, targets, weights)
    # Row i alone: the other row's weights set to 0 (same shape, no recompilation).
    rows = [all_sums(logits, targets, weights * (np.arange(BATCH) == i)[:, None]) for i in range(BATCH)]
    for setting in SETTINGS:
        for key in whole[setting]:
            total = sum(float(row[setting][key]) for row in rows)
            np.testing.assert_allclose(float(whole[setting][key]), total, rtol=1e-6)


def test_all_padding_batch_is_finite(batch):
    logits, targets, weights = batch
    sums = all_sums(logits, targets, np.zeros_like(weights))[0.0, 0.0]
    assert all(float(value) == 0.0 for value in losses.normalize(sums, "num_real_target_tokens").values())


def test_bad_normalization():
    sums = {"loss": 1.0, "z_loss": 0.0, "weight_sum": 1.0, "correct": 1.0}
    with pytest.raises(ValueError, match="num_real_target_tokens"):
        losses.normalize(sums, "num_tokens")
    with pytest.raises(ValueError, match="positive"):
        losses.normalize(sums, 0.0)


def test_jit_end_to_end(batch):
    logits, targets, weights = batch

    @jax.jit
    def metrics(logits, targets, weights):
        sums = losses.cross_entropy(logits, targets, weights, label_smoothing=0.1, z_loss=1e-4)
        return losses.normalize(sums, "num_real_target_tokens"), losses.normalize(sums, 64.0)

    by_tokens, by_constant = metrics(jnp.asarray(logits, jnp.bfloat16), targets, weights)  # bf16 logits upcast
    want = reference(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), targets, weights, 0.1, 1e-4)
    np.testing.assert_allclose(float(by_tokens["loss"]), want["loss"] / want["weight_sum"], rtol=1e-5)
    np.testing.assert_allclose(float(by_constant["loss"]), want["loss"] / 64.0, rtol=1e-5)


@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_custom_gradient_equals_autodiff_of_the_plain_formula(batch, label_smoothing, z_loss):
    """The hand-written VJP (one elementwise pass) equals jax.grad of the textbook loss, with every option."""
    logits, targets, weights = batch
    vocab = logits.shape[-1]

    def plain(x):
        log_z = jax.nn.logsumexp(x, axis=-1)
        log_probs = x - log_z[..., None]
        confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        soft = jnp.where(jnp.arange(vocab) == targets[..., None], confidence, low)
        entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        token = -jnp.sum(soft * log_probs, axis=-1) - entropy + z_loss * log_z**2
        return jnp.sum(token * weights)

    ours = lambda x: losses.cross_entropy(x, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)["loss"]
    np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(ours)(logits), jax.grad(plain)(logits), rtol=1e-5, atol=1e-6
    )  # fp32: p - 1 near 1
    z_metric = lambda x: losses.cross_entropy(x, targets, weights, z_loss=z_loss)["z_loss"]
    plain_z = lambda x: jnp.sum(z_loss * jax.nn.logsumexp(x, axis=-1) ** 2 * weights)
    np.testing.assert_allclose(jax.grad(z_metric)(logits), jax.grad(plain_z)(logits), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------- fused projection


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.0), (0.2, 1e-2)])
def test_projected_cross_entropy_equals_the_loss_of_the_logits(chunk_tokens, label_smoothing, z_loss):
    """The fused, chunked projection + loss: the same sums and the same gradients in hidden and projection as
    ``cross_entropy`` of ``hidden @ projection``, whatever the chunking (1 token: a chunk per row; 1000: one)."""
    rng = np.random.default_rng(1)
    batch, length, d_model, vocab = 6, 5, 8, 13
    hidden = jnp.asarray(rng.standard_normal((batch, length, d_model)), jnp.float32)
    projection = jnp.asarray(rng.standard_normal((d_model, vocab)), jnp.float32)
    targets = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    targets[0, 2:] = 0
    weights = (targets > 0).astype(np.float32)
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)

    def unfused(h, p):
        sums = losses.cross_entropy(jnp.einsum("bld,dv->blv", h, p), targets, weights, **options)
        return sums["loss"], sums

    def fused(h, p):
        sums = losses.projected_cross_entropy(h, p, targets, weights, chunk_tokens=chunk_tokens, **options)
        return sums["loss"], sums

    (want, want_sums), want_grads = jax.value_and_grad(unfused, argnums=(0, 1), has_aux=True)(hidden, projection)
    (got, got_sums), got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, projection)
    for key in ("loss", "z_loss", "weight_sum", "correct"):
        np.testing.assert_allclose(got_sums[key], want_sums[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)
    no_grad = jax.jit(lambda h, p: fused(h, p)[1])(hidden, projection)  # the primal path (evaluation)
    np.testing.assert_allclose(no_grad["loss"], want, rtol=1e-5)


def test_projected_cross_entropy_chunks_divide_the_batch():
    assert losses._num_chunks(batch=12, length=5, chunk_tokens=10) == 6  # 2 rows = 10 tokens per chunk
    assert losses._num_chunks(batch=7, length=5, chunk_tokens=10) == 1  # 7 is prime: one chunk of all rows
    assert losses._num_chunks(batch=8, length=64, chunk_tokens=10) == 8  # at least one row per chunk
