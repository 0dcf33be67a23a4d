"""Model FLOPs of a train step, counted from the config, and the peak FLOP/s of the devices: MFU = the ratio.

Counts the matmuls (projections, MLP, logits) and the attention products of encoder and decoder; a train step is
three forward passes' worth (forward + backward). Elementwise work, softmax and norms are not counted, as usual.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from t5x_lite.network import TransformerConfig

# Dense bf16 peak per chip, FLOP/s (vendor datasheets).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6e": 918e12,
    "tpu v6 lite": 918e12,
}


def forward_flops(cfg: TransformerConfig, batch: int, input_length: int, target_length: int) -> float:
    """FLOPs of one teacher-forced forward pass over a [batch, input_length] / [batch, target_length] batch."""
    d, inner, vocab = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.vocab_size
    mlp = (3 if cfg.mlp_activation.startswith("gated-") else 2) * d * cfg.d_ff
    projections = 4 * d * inner  # query, key, value, out
    encoder_tokens = input_length * cfg.num_encoder_layers * (projections + mlp)
    # Decoder: self-attention and MLP on target tokens; cross-attention query/out on targets, key/value on inputs.
    decoder_tokens = target_length * cfg.num_decoder_layers * (projections + 2 * d * inner + mlp)
    cross_kv = input_length * cfg.num_decoder_layers * 2 * d * inner
    logits = target_length * d * vocab
    matmuls = 2 * (encoder_tokens + decoder_tokens + cross_kv + logits)
    attention = (
        4
        * inner
        * (
            cfg.num_encoder_layers * input_length**2
            + cfg.num_decoder_layers * (target_length**2 + target_length * input_length)
        )
    )  # q.k and weights.v, 2 FLOPs per multiply-add each
    return float(batch * (matmuls + attention))


def train_flops(cfg: TransformerConfig, batch: int, input_length: int, target_length: int) -> float:
    """Forward + backward: 3x the forward pass."""
    return 3.0 * forward_flops(cfg, batch, input_length, target_length)


@functools.lru_cache(maxsize=1)
def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained): the table for known accelerators, else a matmul probe."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"table ({device.device_kind})"
    return _matmul_probe(), f"measured by a float32 matmul probe on {device.platform}"


def _matmul_probe(size: int = 1024, repeats: int = 5) -> float:
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
