"""Decoding over the network's key/value cache, jit-compiled with ``lax.while_loop``.

Greedy decoding for now (what training-time evaluation needs); beam search and sampling belong to the decoding
issue. Ids at or above ``vocab_limit`` (the real vocabulary, when the embedding is padded to a multiple of 128)
are never produced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t5x_lite import network
from t5x_lite.network import Transformer, TransformerConfig


@functools.partial(jax.jit, static_argnames=("cfg", "max_decode_length", "eos_id", "vocab_limit"))
def greedy_decode(
    cfg: TransformerConfig,
    params,
    encoder_input_tokens: jax.Array,
    *,
    max_decode_length: int,
    eos_id: int = 1,
    vocab_limit: int | None = None,
) -> jax.Array:
    """Most likely next token at every step: [batch, max_decode_length] int32, 0 after each row's EOS."""
    batch = encoder_input_tokens.shape[0]
    encoded = Transformer(cfg).apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
    cache = network.init_decode_cache(cfg, params, encoded, encoder_input_tokens, max_decode_length)
    limit = cfg.vocab_size if vocab_limit is None else vocab_limit

    def keep_going(carry):
        position, _, _, done, _ = carry
        return (position < max_decode_length) & ~jnp.all(done)

    def step(carry):
        position, tokens, cache, done, previous = carry
        logits, cache = network.decode_step(cfg, params, cache, encoded, encoder_input_tokens, previous)
        logits = jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)
        chosen = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, chosen[:, None], (0, position))
        return position + 1, tokens, cache, done | (chosen == eos_id), chosen

    start = jnp.zeros((batch,), jnp.int32)  # T5's decoder start token is the padding id 0
    carry = (jnp.int32(0), jnp.zeros((batch, max_decode_length), jnp.int32), cache, jnp.zeros((batch,), bool), start)
    return jax.lax.while_loop(keep_going, step, carry)[1]
