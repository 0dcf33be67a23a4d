"""Token-level cross entropy with label smoothing and z-loss, and loss normalization (T5X's semantics).

Usage::

    sums = cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss=1e-4)
    metrics = normalize(sums, "num_real_target_tokens")  # {'loss', 'z_loss', 'accuracy'}

``cross_entropy`` returns *sums* over the batch, not means: sums add up across microbatches and devices, so
gradient accumulation and data parallelism normalize once, at the end, and agree with one big batch. Padding
(weight 0) is masked by the weights; in packed rows the padding between and after segments has weight 0 too, so
segment ids are not needed here.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

NUM_REAL_TARGET_TOKENS = "num_real_target_tokens"


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted sums over a batch of the per-token loss (cross entropy + z-loss), the z-loss, the weights and the
    weighted count of correct argmax predictions.

    Args:
      logits: ``[batch, length, vocab]``; computed in float32 whatever the input dtype.
      targets: ``[batch, length]`` integer ids.
      weights: ``[batch, length]``, 0 on padding (``decoder_loss_weights``); ``None`` weighs every token 1.
      label_smoothing: T5X's: the target gets ``1 - label_smoothing``, every other id ``label_smoothing / (vocab-1)``,
        and the entropy of that distribution is subtracted so that a perfect prediction has loss 0.
      z_loss: coefficient of ``log(sum(exp(logits)))**2`` per token (keeps the softmax normalizer near 1).
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    token_loss, token_z_loss = _token_losses(logits, targets, float(label_smoothing), float(z_loss))
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss": jnp.sum(token_loss * weights),
        "z_loss": jnp.sum(token_z_loss * weights),
        "weight_sum": jnp.sum(weights),
        "correct": jnp.sum(correct * weights),
    }


def _soft_targets(targets: jax.Array, vocab_size: int, label_smoothing: float, dtype) -> jax.Array:
    """The smoothed target distribution [..., vocab] built elementwise from an iota (fuses; no scatter)."""
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    ids = jax.lax.broadcasted_iota(jnp.int32, targets.shape + (vocab_size,), targets.ndim)
    return jnp.where(ids == targets[..., None], confidence, low_confidence).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: float, z_loss: float):
    """Per-token (cross entropy + z-loss, z-loss). The custom gradient ``softmax * (1 + 2 z log_z) - soft_targets``
    is one elementwise pass over the logits; autodiff of ``take_along_axis`` would scatter into a zero array."""
    return _token_losses_fwd(logits, targets, label_smoothing, z_loss)[0]


def _token_losses_fwd(logits, targets, label_smoothing, z_loss):
    vocab_size = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.sum(jnp.where(jnp.arange(vocab_size) == targets[..., None], logits, 0.0), axis=-1)
    target_log_probs = target_logits - log_z
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low_confidence = label_smoothing / (vocab_size - 1)
        normalizing_constant = -(
            confidence * math.log(confidence) + (vocab_size - 1) * low_confidence * math.log(low_confidence + 1e-20)
        )
        # -sum_j soft_j * log p_j without materializing the [b, l, v] soft targets.
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab_size * log_z
        token_loss = (
            -(confidence - low_confidence) * target_log_probs - low_confidence * sum_log_probs - normalizing_constant
        )
    else:
        token_loss = -target_log_probs
    token_z_loss = z_loss * jnp.square(log_z)
    return (token_loss + token_z_loss, token_z_loss), (logits, targets, log_z)


def _token_losses_bwd(label_smoothing, z_loss, residuals, cotangents):
    logits, targets, log_z = residuals
    g_loss, g_z = cotangents
    probs = jnp.exp(logits - log_z[..., None])
    soft = _soft_targets(targets, logits.shape[-1], label_smoothing, logits.dtype)
    # d(loss)/d(logits) = p - soft + 2 z log_z p; d(z-loss)/d(logits) = 2 z log_z p
    z_term = (2.0 * z_loss * log_z * (g_loss + g_z))[..., None]
    grad = g_loss[..., None] * (probs - soft) + z_term * probs
    return grad, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def normalize(sums: dict[str, jax.Array], normalization: str | float | Any = NUM_REAL_TARGET_TOKENS) -> dict[str, Any]:
    """Sums from ``cross_entropy`` -> ``loss``, ``z_loss`` and ``accuracy``.

    ``normalization`` is ``"num_real_target_tokens"`` (divide by the weight sum: T5X's default for fine-tuning) or a
    constant (T5X's ``loss_normalizing_factor``, e.g. ``batch_size * target_length`` as in T5 pre-training); it must be
    static under jit. Accuracy is always per real token. An all-padding batch gives 0, not NaN.
    """
    weight_sum = sums["weight_sum"]
    safe_weight_sum = jnp.where(weight_sum > 0, weight_sum, 1.0)
    if isinstance(normalization, str):
        if normalization != NUM_REAL_TARGET_TOKENS:
            raise ValueError(
                f"normalization={normalization!r} is unknown; use {NUM_REAL_TARGET_TOKENS!r} or a positive number"
            )
        denominator = safe_weight_sum
    else:
        if isinstance(normalization, numbers.Real) and not normalization > 0:
            raise ValueError(f"normalization={normalization!r} must be positive (or {NUM_REAL_TARGET_TOKENS!r})")
        denominator = normalization
    return {
        "loss": sums["loss"] / denominator,
        "z_loss": sums["z_loss"] / denominator,
        "accuracy": sums["correct"] / safe_weight_sum,
    }
