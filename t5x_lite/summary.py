"""Print a model's parameter table and run one forward pass and a few cached decode steps.

    python -m t5x_lite.summary --model t5_small [--batch 2 --input_length 32 --target_length 16]

Shows, for a preset of ``t5x_lite/presets.py``, every parameter with its shape and logical axes, the total
count, the time of a jit-compiled forward pass, and that step-by-step cached decoding reproduces it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5x_lite import network


def parameter_table(cfg: network.TransformerConfig) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, logical axes) of every parameter, without materializing any of them."""
    boxed = traverse_util.flatten_dict(network.abstract_params(cfg), is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    rows = []
    for path, value in sorted(boxed.items()):
        axes = tuple(value.names) if isinstance(value, nn.Partitioned) else ()
        shape = tuple(nn.meta.unbox(value).shape)
        rows.append(("/".join(path), shape, axes))
    return rows


def main(argv: list[str] | None = None) -> int:
    from t5x_lite.presets import PRESETS, get_model_config

    parser = argparse.ArgumentParser(prog="python -m t5x_lite.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--input_length", type=int, default=32)
    parser.add_argument("--target_length", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = get_model_config(args.model, dropout_rate=0.0)
    rows = parameter_table(cfg)
    width = max(len(name) for name, _, _ in rows)
    print(f"{args.model}: {cfg}\n")
    print(f"{'parameter':<{width}}  {'shape':<22} logical axes")
    for name, shape, axes in rows:
        print(f"{name:<{width}}  {str(shape):<22} {axes}")
    total = sum(math.prod(shape) for _, shape, _ in rows)
    print(f"\n{len(rows)} arrays, {total:,} parameters ({total * 4 / 2**20:,.1f} MiB in float32)\n")

    rng = np.random.default_rng(args.seed)
    encoder_tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, args.input_length)), jnp.int32)
    decoder_tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, args.target_length)), jnp.int32)
    decoder_tokens = decoder_tokens.at[:, 0].set(0)
    params = jax.jit(lambda key: network.init_params(cfg, key))(jax.random.key(args.seed))
    forward = jax.jit(lambda p, e, d: network.Transformer(cfg).apply({"params": p}, e, d))
    start = time.perf_counter()
    logits = forward(params, encoder_tokens, decoder_tokens).block_until_ready()
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(params, encoder_tokens, decoder_tokens).block_until_ready()
    run = time.perf_counter() - start
    print(
        f"forward pass {tuple(encoder_tokens.shape)} -> logits {tuple(logits.shape)}: "
        f"{compile_and_run:.2f} s with compilation, {run * 1e3:.1f} ms after (on {jax.devices()[0].platform})"
    )

    model = network.Transformer(cfg)
    encoded = model.apply({"params": params}, encoder_tokens, method=network.Transformer.encode)
    cache = network.init_decode_cache(cfg, params, encoded, encoder_tokens, args.target_length)
    step = jax.jit(lambda p, c, enc, e, t: network.decode_step(cfg, p, c, enc, e, t))
    stepped = []
    for position in range(args.target_length):
        step_logits, cache = step(params, cache, encoded, encoder_tokens, decoder_tokens[:, position])
        stepped.append(step_logits)
    gap = float(jnp.max(jnp.abs(jnp.stack(stepped, axis=1) - logits)))
    print(f"cached decoding, {args.target_length} steps of one token: max |logits - forward pass| = {gap:.2e}")
    if not np.isfinite(gap) or gap > 1e-3:
        print("error: cached decoding disagrees with the forward pass", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
