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


def check_distillation(temperature: float, distill_weight: float) -> None:
    """Raises a ValueError naming the setting when the distillation temperature or weight is out of range."""
    if not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"distill_temperature={temperature!r} must be a positive number")
    if not (isinstance(distill_weight, numbers.Real) and 0.0 <= distill_weight <= 1.0):
        raise ValueError(f"distill_weight={distill_weight!r} must be in [0, 1] (the share of the teacher's term)")


def distillation_cross_entropy(
    logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    distill_weight: float = 0.5,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016), as ``cross_entropy``'s sums.

    Per token: ``(1 - distill_weight) * cross_entropy + distill_weight * T**2 * KL(teacher_T || student_T)``, where
    ``_T`` is the softmax at temperature ``T`` (the ``T**2`` keeps the gradient's scale independent of ``T``). For a
    one-hot teacher at ``T = 1`` the KL term is the cross entropy itself. ``teacher_logits`` are not differentiated.
    """
    check_distillation(temperature, distill_weight)
    sums = cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    teacher_probs = jnp.exp(teacher)
    # 0 * log 0 = 0: a teacher certain of one token contributes that token only.
    token_kl = jnp.sum(jnp.where(teacher_probs > 0, teacher_probs * (teacher - student), 0.0), axis=-1)
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    kl_sum = temperature**2 * jnp.sum(token_kl * weights)
    sums["loss"] = (1.0 - distill_weight) * sums["loss"] + distill_weight * kl_sum
    return sums


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


# ----------------------------------------------------------------------------------------------------------------
# The output projection and the cross entropy fused, a chunk of rows at a time.
# ----------------------------------------------------------------------------------------------------------------


def projected_cross_entropy(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_tokens: int = 1024,
) -> dict[str, jax.Array]:
    """``cross_entropy(hidden @ projection, ...)`` without ever holding the [batch, length, vocab] logits.

    The rows are cut into chunks of about ``chunk_tokens`` tokens (row ``j`` of chunk ``c`` is batch row
    ``j * num_chunks + c``, so a batch sharded over devices stays sharded inside every chunk); each chunk computes
    its logits, the loss sums and, when differentiated, its gradients at once, while its logits are still in cache.
    The gradient flows through ``loss`` only (which includes the z-loss); ``z_loss``, ``weight_sum`` and
    ``correct`` are metrics. ``correct`` counts a token when its target logit is the largest (ties count, where
    ``cross_entropy``'s argmax takes the first).

    Args:
      hidden: ``[batch, length, d_model]`` final decoder activations (after any output rescaling).
      projection: ``[d_model, vocab]`` (the tied embedding transposed, or the untied ``logits_dense`` kernel).
      targets, weights, label_smoothing, z_loss: as in ``cross_entropy``.
    """
    batch, length, _ = hidden.shape
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    num_chunks = _num_chunks(batch, length, chunk_tokens)

    def chunked(x: jax.Array) -> jax.Array:  # [batch, ...] -> [num_chunks, batch // num_chunks, ...]
        x = x.reshape((batch // num_chunks, num_chunks) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    sums = _fused_sums(
        chunked(hidden),
        projection,
        chunked(targets.astype(jnp.int32)),
        chunked(weights),
        float(label_smoothing),
        float(z_loss),
    )
    loss, metrics = sums
    return {"loss": loss, **jax.tree.map(jax.lax.stop_gradient, metrics)}


def _num_chunks(batch: int, length: int, chunk_tokens: int) -> int:
    """The most chunks, dividing ``batch``, that keep at least ``chunk_tokens`` tokens (or one row) in each."""
    rows = max(1, -(-chunk_tokens // length))
    best = 1
    for count in range(1, batch + 1):
        if batch % count == 0 and batch // count >= min(rows, batch):
            best = count
    return best


def _chunk_statistics(h, projection, targets, weights, label_smoothing, z_loss, with_grads):
    """Loss sums of one chunk ([rows, length, d] activations) and, ``with_grads``, d(loss sum)/d(h, projection)."""
    rows, length, d_model = h.shape
    h = h.reshape(rows * length, d_model)
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    logits = jnp.dot(h, projection.astype(h.dtype), preferred_element_type=jnp.float32)
    vocab_size = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    token_loss = log_z - target_logits
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab_size - 1)
        constant = -(confidence * math.log(confidence) + (vocab_size - 1) * low * math.log(low + 1e-20))
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab_size * log_z
        token_loss = (confidence - low) * token_loss - low * sum_log_probs - constant
    token_z_loss = z_loss * jnp.square(log_z)
    correct = (target_logits >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    metrics = {
        "z_loss": jnp.sum(token_z_loss * weights),
        "weight_sum": jnp.sum(weights),
        "correct": jnp.sum(correct * weights),
    }
    loss = jnp.sum((token_loss + token_z_loss) * weights)
    if not with_grads:
        return loss, metrics, None
    probs = jnp.exp(logits - log_z[:, None])
    soft = _soft_targets(targets, vocab_size, label_smoothing, jnp.float32)
    grad_logits = weights[:, None] * ((1.0 + 2.0 * z_loss * log_z)[:, None] * probs - soft)
    grad_h = jnp.dot(grad_logits.astype(h.dtype), projection.astype(h.dtype).T, preferred_element_type=jnp.float32)
    grad_projection = jnp.dot(h.T, grad_logits.astype(h.dtype), preferred_element_type=jnp.float32)
    return loss, metrics, (grad_h.reshape(rows, length, d_model), grad_projection)


def _scan_chunks(hidden, projection, targets, weights, label_smoothing, z_loss, with_grads):
    zero = jnp.zeros((), jnp.float32)
    init = (zero, {"z_loss": zero, "weight_sum": zero, "correct": zero})
    if with_grads:
        init = (*init, jnp.zeros(projection.shape, jnp.float32))

    def body(carry, chunk):
        h, t, w = chunk
        loss, metrics, grads = _chunk_statistics(h, projection, t, w, label_smoothing, z_loss, with_grads)
        totals = (carry[0] + loss, jax.tree.map(jnp.add, carry[1], metrics))
        if not with_grads:
            return totals, None
        grad_h, grad_projection = grads
        return (*totals, carry[2] + grad_projection), grad_h

    return jax.lax.scan(body, init, (hidden, targets, weights))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_sums(hidden, projection, targets, weights, label_smoothing, z_loss):
    (loss, metrics), _ = _scan_chunks(hidden, projection, targets, weights, label_smoothing, z_loss, False)
    return loss, metrics


def _fused_sums_fwd(hidden, projection, targets, weights, label_smoothing, z_loss):
    (loss, metrics, grad_projection), grad_hidden = _scan_chunks(
        hidden, projection, targets, weights, label_smoothing, z_loss, True
    )
    return (loss, metrics), (grad_hidden.astype(hidden.dtype), grad_projection.astype(projection.dtype))


def _fused_sums_bwd(label_smoothing, z_loss, residuals, cotangents):
    grad_hidden, grad_projection = residuals
    g_loss = cotangents[0]  # the metrics' cotangents are dropped: they are stop_gradient-ed by the caller
    return (
        (g_loss * grad_hidden).astype(grad_hidden.dtype),
        (g_loss * grad_projection).astype(grad_projection.dtype),
        None,
        None,
    )


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)
