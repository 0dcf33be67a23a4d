"""What a trained encoder-decoder is used for: ``predict_batch`` (decode with any of the decoding methods) and
``score_batch`` (the log-likelihood of given targets), on feature batches of the data pipeline."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from t5x_lite import decoding, network
from t5x_lite.network import TransformerConfig


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode: beam search when ``beam_size > 1``, sampling when ``temperature`` is set (0 is greedy),
    otherwise greedy. ``max_decode_length`` 0 means the caller's default (the task's target length)."""

    beam_size: int = 1
    alpha: float = 0.6
    temperature: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    max_decode_length: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size={self.beam_size} must be at least 1 (1 is greedy)")
        if self.beam_size > 1 and self.temperature is not None:
            raise ValueError(
                f"beam_size={self.beam_size} and temperature={self.temperature} were both given; "
                "choose beam search or sampling"
            )
        if self.temperature is None and (self.top_k or self.top_p < 1.0):
            raise ValueError("top_k / top_p apply to sampling: also give a temperature (1.0 samples the model as is)")
        if self.max_decode_length < 0:
            raise ValueError(f"max_decode_length={self.max_decode_length} must be >= 0 (0: the task's target length)")

    @property
    def method(self) -> str:
        if self.beam_size > 1:
            return "beam"
        return "sample" if self.temperature is not None else "greedy"

    def describe(self) -> str:
        """One line for logs and result files, e.g. ``beam search (beam 4, alpha 0.6)``."""
        if self.method == "beam":
            return f"beam search (beam {self.beam_size}, alpha {self.alpha})"
        if self.method == "sample":
            options = f"temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}, seed {self.seed}"
            return f"sampling ({options})"
        return "greedy"


def predict_batch(
    cfg: TransformerConfig,
    params: Any,
    encoder_input_tokens: jax.Array,
    settings: DecodeSettings = DecodeSettings(),
    *,
    max_decode_length: int,
    vocab_limit: int | None = None,
    eos_id: int = 1,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decoded ids [batch, length] and their scores [batch] (the best beam for beam search).

    ``settings.max_decode_length`` (when not 0) overrides ``max_decode_length``; sampling uses ``rng`` or, if
    None, a key made from ``settings.seed``.
    """
    length = settings.max_decode_length or max_decode_length
    common = dict(max_decode_length=length, eos_id=eos_id, vocab_limit=vocab_limit)
    if settings.method == "beam":
        tokens, scores = decoding.beam_search(
            cfg, params, encoder_input_tokens, beam_size=settings.beam_size, alpha=settings.alpha, **common
        )
        return tokens[:, 0], scores[:, 0]
    if settings.method == "sample":
        key = jax.random.key(settings.seed) if rng is None else rng
        return decoding.sample_decode(
            cfg,
            params,
            encoder_input_tokens,
            key,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            **common,
        )
    return decoding.greedy_decode(cfg, params, encoder_input_tokens, **common)


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_batch(cfg: TransformerConfig, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Log-likelihood [batch] of ``decoder_target_tokens`` (summed over its non-padding tokens, or weighted by
    ``decoder_loss_weights``) given ``encoder_input_tokens``, teacher-forced on ``decoder_input_tokens``."""
    targets = batch["decoder_target_tokens"]
    logits = network.build_model(cfg).apply(
        {"params": network.runtime_params(cfg, params)},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        None,  # causal masking only, as in decoding: a (rarely) generated id 0 is then scored like any token
        batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"),
        batch.get("encoder_positions"),
        batch.get("decoder_positions"),
    )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0).astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(picked * weights, axis=-1)
