"""Flax linen building blocks of the encoder-decoder Transformer.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) and every large activation a
logical constraint, so that ``partitioning.py`` can place the same model on any mesh. Parameter names and
layouts follow T5X (``token_embedder/embedding``, ``attention/query/kernel`` of shape [embed, heads, kv],
``relpos_bias/rel_embedding`` of shape [heads, buckets]) so that T5-family checkpoints convert cleanly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import quantization

# Additive bias for masked attention logits: large enough to zero a softmax weight, finite so that a fully
# masked row (a padding query) gives a uniform distribution rather than NaN.
NEG_INF = -1e10

Initializer = Callable[..., jax.Array]
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
BIAS_INITS = ("zeros", "fan_in_uniform")  # fan_in_uniform: U(+-1/sqrt(fan_in)), PyTorch's nn.Linear default


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """Glorot & Bengio's uniform initializer of an [in, out] matrix, times ``gain`` (torch's xavier_uniform_)."""
    return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def _symmetric_uniform(limit: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


# PyTorch's nn.Linear weight default, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
    """A linear map contracting ``axis`` of the input into ``features`` (a tuple for multi-head outputs)."""

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    kernel_axes: tuple[str, ...] = ()
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: str = "zeros"  # one of BIAS_INITS

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = _normalize_axes(self.axis, inputs.ndim)
        kernel_shape = tuple(inputs.shape[a] for a in axis) + features
        fan_in, fan_out = math.prod(kernel_shape[: len(axis)]), math.prod(features)

        def init_as_matrix(key, shape, dtype):
            # Fan-in/out of the [in, out] matrix the kernel stands for, whatever its number of axes.
            return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init_as_matrix, self.kernel_axes),
            kernel_shape,
            self.param_dtype,
        )
        kernel = jnp.asarray(kernel, self.dtype)
        inputs = jnp.asarray(inputs, self.dtype)
        contract = (axis, tuple(range(len(axis))))
        out = jax.lax.dot_general(inputs, kernel, (contract, ((), ())))
        if self.use_bias:
            if self.bias_init not in BIAS_INITS:
                raise ValueError(f"bias_init={self.bias_init!r} is unknown; use one of {BIAS_INITS}")
            bias_init = nn.initializers.zeros
            if self.bias_init == "fan_in_uniform":
                bias_init = _symmetric_uniform(1.0 / math.sqrt(fan_in))
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(bias_init, self.kernel_axes[-len(features) :]),
                features,
                self.param_dtype,
            )
            out = out + jnp.asarray(bias, self.dtype)
        return out


class Embed(nn.Module):
    """Token (or learned position) embedding table; ``attend`` reuses it as a tied output projection."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
    # Quantization-aware training: look rows up in the table as PTQ will store it (per-row int8 scales, rounded),
    # with straight-through gradients. Set for a table that ``attend`` ties to the output projection.
    qat: str = ""
    # LoRA on the table itself (``TransformerConfig.lora_embed``): the table acts as ``embedding + A @ B * scale``
    # in lookups and in ``attend`` alike, A [num_embeddings, rank] starting at zero, B [rank, features] random.
    lora_rank: int = 0
    lora_scale: float = 1.0
    # Trainable rows (``TransformerConfig.lora_rows``, PEFT's "trainable tokens"): the table acts as ``embedding``
    # with ``delta[i]`` added to row ``lora_rows[i]``, delta [len(lora_rows), features] starting at zero.
    lora_rows: tuple[int, ...] = ()

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        if self.lora_rank:
            shape_a, shape_b = (self.num_embeddings, self.lora_rank), (self.lora_rank, self.features)
            zeros = nn.initializers.zeros
            self.embedding_lora_a = self.param(
                "embedding_lora_a", nn.with_logical_partitioning(zeros, (self.axes[0], None)), shape_a, self.param_dtype
            )
            self.embedding_lora_b = self.param(
                "embedding_lora_b",
                nn.with_logical_partitioning(self.embedding_init, (None, self.axes[1])),
                shape_b,
                self.param_dtype,
            )
        if self.lora_rows:
            self.embedding_lora_rows = self.param(
                "embedding_lora_rows",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
                (len(self.lora_rows), self.features),
                self.param_dtype,
            )
        if self.lora_rank or self.lora_rows:
            self.lora_table = LowRankProduct(self.lora_scale, self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer ids, got dtype {ids.dtype}")
        if quantization.is_quantized(self.embedding):  # int8 rows and their scales (t5x_lite.quantize)
            rows = quantization.take_rows(self.embedding, ids, self.dtype)
        else:
            table = quantization.fake_quantize_rows(self.embedding, self.qat) if self.qat else self.embedding
            rows = jnp.take(jnp.asarray(table, self.dtype), ids, axis=0)
        if self.lora_rank:
            rows = rows + self.lora_table.rows(jnp.take(self.embedding_lora_a, ids, axis=0), self.embedding_lora_b)
        if self.lora_rows:  # each id's change: its row of delta, or a zero row for an id lora_rows does not name
            slot = np.zeros(self.num_embeddings, np.int32)
            slot[np.asarray(self.lora_rows)] = np.arange(1, len(self.lora_rows) + 1)
            delta = jnp.asarray(self.embedding_lora_rows, self.dtype)
            changes = jnp.concatenate([jnp.zeros((1, self.features), self.dtype), delta])
            rows = rows + jnp.take(changes, jnp.take(jnp.asarray(slot), ids), axis=0)
        return rows

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits of ``query`` against every embedding row: [..., features] -> [..., num_embeddings]."""
        # dot_general, not einsum: Qwix's LoRA einsum path cannot record its adapter on a module built in setup
        query = jnp.asarray(query, self.dtype)
        contract = (((query.ndim - 1,), (1,)), ((), ()))
        logits = jax.lax.dot_general(query, jnp.asarray(self.embedding, self.dtype), contract)
        if self.lora_rank:
            logits = logits + self.lora_table.logits(query, self.embedding_lora_a, self.embedding_lora_b)
        if self.lora_rows:  # only the named rows' logits change: a [..., rows] product added into those columns
            changed = self.lora_table.attend(query, jnp.asarray(self.embedding_lora_rows, self.dtype))
            logits = logits.at[..., np.asarray(self.lora_rows, np.int32)].add(changed)
        return logits


def row_changes(delta: jax.Array, rows: tuple[int, ...], num_rows: int) -> jax.Array:
    """A [num_rows, features] table holding ``delta[i]`` in row ``rows[i]`` and zeros elsewhere."""
    return jnp.zeros((num_rows, delta.shape[-1]), delta.dtype).at[np.asarray(rows, np.int32)].set(delta)


class LowRankProduct(nn.Module):
    """The matmuls of a token table's adapter (``Embed.lora_rank``, ``Embed.lora_rows``), in a module of their own
    without parameters, so that Qwix's rules (``lora.wrap``) can leave them alone: neither quantized nor given
    adapters of their own."""

    scale: float
    dtype: jnp.dtype = jnp.float32

    def rows(self, rows_a: jax.Array, b: jax.Array) -> jax.Array:
        """``(A @ B)[ids] * scale`` from ``A[ids]``: [..., rank] -> [..., features]."""
        return jnp.einsum("...r,rf->...f", jnp.asarray(rows_a, self.dtype), jnp.asarray(b, self.dtype)) * self.scale

    def logits(self, query: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """``query @ (A @ B).T * scale``: [..., features] -> [..., rows of A], through the rank."""
        low = jnp.einsum("...f,rf->...r", query, jnp.asarray(b, self.dtype))
        return jnp.einsum("...r,vr->...v", low, jnp.asarray(a, self.dtype)) * self.scale

    def attend(self, query: jax.Array, table: jax.Array) -> jax.Array:
        """``query @ table.T`` (the trainable rows' changes, ``Embed.lora_rows``): [..., features] -> [..., rows]."""
        return jnp.einsum("...f,vf->...v", query, table)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, variance computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = jnp.asarray(x, jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        return jnp.asarray(y * jnp.asarray(scale, jnp.float32), self.dtype)


class LayerNorm(nn.Module):
    """Classic layer norm with scale and bias, statistics in float32."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
        features = (x.shape[-1],)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), features, self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), features, self.param_dtype
        )
        return jnp.asarray(y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32), self.dtype)


@functools.lru_cache(maxsize=64)
def _bucket_table(max_offset: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Buckets of relative positions -max_offset..max_offset, computed on the host once per shape."""
    return relative_position_bucket(np.arange(-max_offset, max_offset + 1), bidirectional, num_buckets, max_distance)


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of ``key_position - query_position``: exact buckets near 0, log-spaced up to max_distance.

    Computed with NumPy in float32, in the same order of operations as the reference implementations, so that
    positions on a bucket boundary land in the same bucket (a float rounding there would change the logits).
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        distance = np.abs(rel)
    else:
        distance = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    safe = np.maximum(distance, 1).astype(np.float32)
    log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


class RelativePositionBiases(nn.Module):
    """Learned per-head bias of each (query, key) position pair, looked up by T5's relative-position bucket."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: int | jax.Array, key_length: int) -> jax.Array:
        """Bias [1, heads, q, k]. ``query_positions`` is a query length (positions 0..q-1) or a [q] array."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        if isinstance(query_positions, int):
            rel = np.arange(key_length)[None, :] - np.arange(query_positions)[:, None]
            buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        else:
            lookup = _bucket_table(key_length, self.bidirectional, self.num_buckets, self.max_distance)
            rel = jnp.arange(key_length)[None, :] - jnp.asarray(query_positions)[:, None]
            buckets = jnp.take(jnp.asarray(lookup), rel + key_length, axis=0)
        values = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)  # [heads, q, k]
        return values[None]


def sinusoidal_positions(positions: jax.Array, features: int, max_timescale: float = 10_000.0) -> jax.Array:
    """Fixed sin/cos position encodings (Vaswani et al. 2017): [..., length] -> [..., length, features]."""
    half = features // 2
    inv_freq = jnp.exp(-math.log(max_timescale) * jnp.arange(half, dtype=jnp.float32) * 2.0 / features)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    encoding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if features % 2:
        encoding = jnp.pad(encoding, [(0, 0)] * (encoding.ndim - 1) + [(0, 1)])
    return encoding


@functools.lru_cache(maxsize=64)
def sinusoidal_table(length: int, features: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """``sinusoidal_positions`` of positions 0..length-1 as a host constant [length, features] (float32): the
    compiled step looks rows up instead of computing sines and cosines of every position of every row."""
    half = features // 2
    inv_freq = np.exp(-math.log(max_timescale) * np.arange(half, dtype=np.float32) * 2.0 / features).astype(np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)
    if features % 2:
        table = np.pad(table, [(0, 0), (0, 1)])
    table.setflags(write=False)
    return table


def attention_mask_bias(
    query_valid: jax.Array,
    key_valid: jax.Array,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    causal: bool = False,
) -> jax.Array:
    """Additive attention bias [batch, 1, q, k]: 0 where a query may see a key, NEG_INF elsewhere.

    A key is hidden when it is padding, belongs to another packed segment, or (``causal``) lies in the future.
    """
    allowed = query_valid[:, :, None] & key_valid[:, None, :]
    if query_segment_ids is not None and key_segment_ids is not None:
        allowed &= query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    if causal:
        q_len, k_len = query_valid.shape[1], key_valid.shape[1]
        allowed &= jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :]
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]


DROPOUT_GENERATORS = ("threefry", "hash")


def _hash32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash whose output bits each flip with probability ~1/2 for any input bit flipped
    (Chris Wellons' "triple32" xorshift-multiply constants)."""
    x = x ^ (x >> 17)
    x = x * jnp.uint32(0xED5AD4BB)
    x = x ^ (x >> 11)
    x = x * jnp.uint32(0xAC4C1B51)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x31848BAB)
    return x ^ (x >> 14)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Counter-based uint32 bits: a keyed hash of each element's index in ``shape``. Two words drawn from ``key``
    (threefry, on 2 numbers) select the hash; the bits are a pure function of (key, index), so they do not depend
    on how the array is sharded, and cost about 20 integer operations per element instead of threefry's ~100."""
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    for axis in range(1, len(shape)):
        index = index * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return _hash32(_hash32(index ^ words[0]) + words[1])


class Dropout(nn.Module):
    """Inverted dropout (``flax.linen.Dropout``'s semantics and key derivation) with a choice of random bits:
    ``threefry`` (``jax.random.bernoulli``, flax's own) or ``hash`` (``hash_bits``, much cheaper on CPUs)."""

    rate: float
    generator: str = "threefry"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return inputs
        if self.generator not in DROPOUT_GENERATORS:
            raise ValueError(f"dropout generator {self.generator!r} is unknown; use one of {DROPOUT_GENERATORS}")
        keep_prob = 1.0 - self.rate
        key = self.make_rng("dropout")
        if self.generator == "threefry":
            mask = jax.random.bernoulli(key, p=keep_prob, shape=inputs.shape)
        else:  # keep where bits < keep_prob * 2**32
            threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
            mask = hash_bits(key, inputs.shape) < jnp.uint32(threshold)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # T5 v1.1's (HF "gelu_new")
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}
MLP_ACTIVATIONS = tuple(list(_ACTIVATIONS) + [f"gated-{name}" for name in _ACTIVATIONS])


# How the non-decoding attention computes softmax(q.k + bias).v: "einsum" spells it out (any mask, attention
# dropout); "xla" and "cudnn" call ``jax.nn.dot_product_attention`` with a ``FusedMask``, the latter a fused
# flash-attention kernel of cuDNN (GPU, bf16/fp16). Decoding with a key/value cache always uses "einsum".
ATTENTION_KERNELS = ("einsum", "xla", "cudnn")


@flax.struct.dataclass
class FusedMask:
    """The mask of ``jax.nn.dot_product_attention``: right padding as lengths, a causal flag, and the position bias.

    cuDNN differentiates an attention bias only when its batch dimension is 1, so padding travels as lengths
    ([batch] int32) and only the shared relative-position bias ([1, heads, q, k]) as a bias. Lengths describe
    right padding only: a row must hold its real tokens first and padding (id 0) after them, as the pipelines
    make it.
    """

    query_lengths: jax.Array
    key_lengths: jax.Array
    position_bias: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)


def fused_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: FusedMask, implementation: str
) -> jax.Array:
    """softmax(query.key + position_bias).value over [batch, length, heads, d_kv] inputs, unscaled like T5."""
    bias = mask.position_bias
    if bias is not None and implementation == "cudnn":
        bias = bias.astype(query.dtype)  # cuDNN needs the bias in the inputs' dtype (NaN gradients in float32)
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        scale=1.0,
        is_causal=mask.causal,
        query_seq_lengths=mask.query_lengths,
        key_value_seq_lengths=mask.key_lengths,
        implementation=implementation,
    )


def _write_step(cached_key, cached_value, new_key: jax.Array, new_value: jax.Array, index: jax.Array):
    """Write one decoding step's keys/values ([rows, 1, heads, d_kv]) into the head-major self-attention cache.

    Greedy and sampling: one cache row per query row, the step at position ``index``. Beam search: one cache row
    per example holding all its beam slots, keys [examples, heads, d_kv, length x beams] ordered (position, slot),
    so the step's beams land side by side at ``index * beams`` and no beam's history ever moves.
    """
    rows, length, heads, d_kv = new_key.shape
    cache_rows = cached_key.value.shape[0]
    beams = rows // cache_rows
    if beams > 1 and length != 1:
        raise ValueError(f"beam-search decoding writes one position per step, got {length}")
    new_key = new_key.reshape(cache_rows, beams * length, heads, d_kv)
    new_value = new_value.reshape(cache_rows, beams * length, heads, d_kv)
    start = index * beams
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, new_key.transpose(0, 2, 3, 1), (0, 0, 0, start))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, new_value.transpose(0, 2, 1, 3), (0, 0, start, 0)
    )
    return cached_key.value, cached_value.value


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with an optional key/value cache for step-by-step decoding.

    Self-attention in decode mode writes the new key/value at ``decode_index`` of a cache sized at the first
    (cache-creating) call; cross-attention in decode mode projects the encoder outputs once and reuses them.
    """

    num_heads: int
    d_kv: int
    dropout_rate: float = 0.0
    scale_qk: bool = False
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init  # query, key, value (and out, unless out_kernel_init is set)
    out_kernel_init: Initializer | None = None
    bias_init: str = "zeros"  # of the query, key and value biases (the out bias starts at 0)
    kernel: str = "einsum"  # one of ATTENTION_KERNELS; "xla"/"cudnn" take a FusedMask as attention_bias
    dropout_generator: str = "threefry"  # one of DROPOUT_GENERATORS

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        attention_bias: jax.Array | FusedMask | None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        decode_index: jax.Array | None = None,
        is_cross_attention: bool = False,
    ) -> jax.Array:
        projection = functools.partial(
            DenseGeneral,
            features=(self.num_heads, self.d_kv),
            kernel_axes=("embed", "heads", "kv"),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        if self.scale_qk:
            query_init = self.kernel_init
        else:  # T5: the 1/sqrt(d_kv) of dot-product attention is folded into the query's initialization
            query_init = lambda *args: self.kernel_init(*args) / math.sqrt(self.d_kv)
        query = projection(kernel_init=query_init, name="query")(inputs_q)

        cache_ready = decode and self.has_variable("cache", "cached_key")
        if self.scale_qk:
            query = query / jnp.sqrt(self.d_kv).astype(query.dtype)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
        if not decode:
            key = nn.with_logical_constraint(projection(name="key")(inputs_kv), ("batch", "length", "heads", "kv"))
            value = nn.with_logical_constraint(projection(name="value")(inputs_kv), ("batch", "length", "heads", "kv"))
            if isinstance(attention_bias, FusedMask):
                if not deterministic and self.dropout_rate > 0:
                    raise ValueError(
                        f"attention kernel {self.kernel!r} has no attention dropout; "
                        "train with dropout_rate=0 or attention_kernel='einsum'"
                    )
                context = fused_attention(query, key, value, attention_bias, self.kernel)
                return self._project_out(context, inputs_q.shape[-1])
            # Head-major operands ([b, h, len, d_kv]), as in decoding: XLA's CPU backend computes the batched
            # products of "bqhd,bkhd->bhqk" and "bhqk,bkhd->bqhd" as strided dots, 2-3x slower (t5_small encoder
            # attention at 64 x 64 tokens: 21 -> 7.6 ms a layer; the gradient -35% to +9% by shape).
            logits = jnp.einsum(
                "bhqd,bhkd->bhqk",
                query.transpose(0, 2, 1, 3),
                key.transpose(0, 2, 1, 3),
                preferred_element_type=jnp.float32,
            )
            value = value.transpose(0, 2, 1, 3)  # [b, h, len, d_kv], as the decoding caches hold it
        else:
            # Caches are head-major (keys [b, h, d_kv, len], values [b, h, len, d_kv]): the per-step dot products
            # read them as stored, where [b, len, h, d_kv] made XLA transpose every cache at every step.
            if is_cross_attention and cache_ready:
                key = self.get_variable("cache", "cached_key")
                value = self.get_variable("cache", "cached_value")
            else:
                new_key = projection(name="key")(inputs_kv)  # [rows, length, heads, d_kv]
                new_value = projection(name="value")(inputs_kv)
                key, value = new_key.transpose(0, 2, 3, 1), new_value.transpose(0, 2, 1, 3)
                if is_cross_attention:
                    self.put_variable("cache", "cached_key", key)
                    self.put_variable("cache", "cached_value", value)
                else:
                    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
                    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
                    if cache_ready:
                        if decode_index is None:
                            raise ValueError("self-attention in decode mode needs decode_index")
                        key, value = _write_step(cached_key, cached_value, new_key, new_value, decode_index)
            key = nn.with_logical_constraint(key, ("batch", "heads", "kv", "length"))
            value = nn.with_logical_constraint(value, ("batch", "heads", "length", "kv"))
            query_rows = query.shape[0]
            if key.shape[0] != query_rows:
                # Beam search: a cache row belongs to one example and the queries are the example's beams,
                # adjacent. The beams attend as extra query positions of their example, so the cache is read once
                # per example instead of once per beam (the self-attention bias says which keys each beam sees).
                if query_rows % key.shape[0]:
                    raise ValueError(
                        f"attention cache has {key.shape[0]} rows for {query_rows} query rows; the query rows must "
                        "be a whole number of (adjacent) beams per cached example"
                    )
                query = query.reshape((key.shape[0], -1) + query.shape[2:])
            logits = jnp.einsum("bqhd,bhdk->bhqk", query, key, preferred_element_type=jnp.float32)
        if attention_bias is not None:
            logits = logits + attention_bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if not deterministic and self.dropout_rate > 0:
            weights = Dropout(rate=self.dropout_rate, generator=self.dropout_generator)(weights, deterministic=False)
        # [b, h, q, d_kv] first, then the transpose: asked for "bqhd" directly, XLA's CPU backend computes the
        # product as a transposed dot (the beam-search step's [b, h, beams, length] x [b, h, length, d_kv]: 14x slower).
        context = jnp.einsum("bhqk,bhkd->bhqd", weights, value).transpose(0, 2, 1, 3)
        context = context.reshape(inputs_q.shape[:2] + context.shape[2:])
        return self._project_out(context, inputs_q.shape[-1])

    @nn.nowrap
    def _project_out(self, context: jax.Array, features: int) -> jax.Array:
        """The ``out`` projection [batch, length, heads, d_kv] -> [batch, length, features] (in the caller's scope)."""
        context = nn.with_logical_constraint(context, ("batch", "length", "heads", "kv"))
        out = DenseGeneral(
            features=features,
            axis=(-2, -1),
            kernel_axes=("heads", "kv", "embed"),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.out_kernel_init or self.kernel_init,
            name="out",
        )(context)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
    """Position-wise feed-forward block: ``wi`` (or gated ``wi_0``/``wi_1``), activation, dropout, ``wo``."""

    d_ff: int
    activation: str = "relu"
    dropout_rate: float = 0.0
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: str = "zeros"  # one of BIAS_INITS
    dropout_generator: str = "threefry"  # one of DROPOUT_GENERATORS

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        dense = functools.partial(
            DenseGeneral,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        gated = self.activation.startswith("gated-")
        act = _ACTIVATIONS[self.activation.removeprefix("gated-")]
        if gated:
            hidden = act(dense(self.d_ff, kernel_axes=("embed", "mlp"), name="wi_0")(inputs))
            hidden = hidden * dense(self.d_ff, kernel_axes=("embed", "mlp"), name="wi_1")(inputs)
        else:
            hidden = act(dense(self.d_ff, kernel_axes=("embed", "mlp"), name="wi")(inputs))
        hidden = Dropout(rate=self.dropout_rate, generator=self.dropout_generator)(hidden, deterministic=deterministic)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        out = dense(inputs.shape[-1], kernel_axes=("mlp", "embed"), name="wo")(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))
