"""The encoder-decoder Transformer: one frozen ``TransformerConfig`` covers T5 v1.0, T5 v1.1 / mT5 and the
classic Transformer of Vaswani et al. (2017).

Usage::

    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    logits = model.apply({'params': params}, encoder_input_tokens, decoder_input_tokens)

Token id 0 is padding (and T5's decoder start token), so padding masks come from ``tokens > 0``; packed rows
pass ``*_segment_ids`` (and ``*_positions`` for absolute position embeddings).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import layers, lora, quantization

NORM_TYPES = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
POSITION_EMBEDDINGS = ("relative", "sinusoidal", "learned")
REMAT_POLICIES = ("none", "minimal", "full")
DTYPES = ("float32", "bfloat16", "float16")
INIT_SCHEMES = ("t5", "fairseq")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every architectural choice of the network. Frozen, hashable and JSON-serializable."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    d_kv: int | None = None  # per-head width; None means d_model // num_heads
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1  # residual and embedding dropout (and, by default, the two below)
    attention_dropout_rate: float | None = None  # on attention weights; None: dropout_rate (T5), fairseq: 0
    activation_dropout_rate: float | None = None  # on the MLP's hidden activations; None: dropout_rate (T5)
    mlp_activation: str = "relu"  # relu | gelu | gelu_exact | silu, optionally "gated-" prefixed
    norm_type: str = "rmsnorm"  # rmsnorm (T5) | layernorm (classic, with bias)
    norm_position: str = "pre"  # pre (T5) | post (Vaswani et al.)
    layer_norm_epsilon: float = 1e-6
    position_embedding: str = "relative"  # relative (T5) | sinusoidal | learned
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    max_position_embeddings: int = 512  # table size of learned absolute positions
    scale_qk: bool = False  # divide q.k by sqrt(d_kv) (classic); T5 folds it into the query's initialization
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (classic)
    use_bias: bool = False  # biases in dense layers (classic)
    share_embeddings: bool = True  # one token table for the encoder and the decoder
    tie_word_embeddings: bool = True  # the output projection is the decoder's token table
    rescale_logits: bool = True  # multiply the decoder output by d_model**-0.5 before projecting (T5 v1.0)
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"  # parameters
    scan_layers: bool = False  # nn.scan over layers: compile time flat in depth
    # One layer's parameters reused by every layer of the encoder and of the decoder (ALBERT, Universal
    # Transformer): a scanned stack whose parameters are broadcast instead of stacked. Needs scan_layers=True.
    share_layers: bool = False
    remat_policy: str = "none"  # none | minimal (save matmul outputs) | full (save nothing)
    attention_kernel: str = "einsum"  # einsum (any mask, dropout) | xla | cudnn (GPU flash attention, bf16)
    dropout_generator: str = "threefry"  # random bits of dropout masks: threefry (flax's) | hash (cheap on CPUs)
    init_scheme: str = "t5"  # initial weights: t5 (T5X's fan-in scaling) | fairseq (Xavier attention, torch MLP)
    # Unscanned layers initialized through the scanned layout (``initializer``): XLA compiles one layer's random
    # initializers instead of one per layer (t5_v1_1_base: 15 s -> 2 s on a CPU). Same distributions, other values.
    init_through_scan: bool = False
    # Post-training quantization (t5x_lite.quantize): "" (float) or a t5x_lite.quantization scheme (int8,
    # int8_dynamic, fp8); the parameters are then Qwix-quantized trees, and ``build_model`` wraps the network.
    quantization: str = ""
    quantize_embeddings: bool = True  # False keeps the token table / output projection in float
    # Quantization-aware training: "" or a scheme; the parameters stay float and every forward pass runs on their
    # fake-quantized copies (Qwix QT, straight-through gradients). ``python -m t5x_lite.quantize`` then stores them.
    qat: str = ""
    # LoRA (t5x_lite.lora): rank > 0 adds Qwix low-rank adapters (scaled by alpha / rank; None: alpha = rank) to
    # every attention and MLP weight; training then updates the adapters only.
    lora_rank: int = 0
    lora_alpha: float | None = None
    # ... and to the output projection (the tied token table as it computes logits, or logits_dense): the lookup of
    # input tokens stays as it was. For a new target language the output distribution is what has to move most.
    lora_output: bool = False
    # ... and to every token table, as a whole (embedding + A @ B * alpha / rank in lookups and in the tied output
    # projection alike; A [vocab, rank] starts at zero): new tokens get new embeddings. A tied table's adapter
    # already adapts the output projection, so it does not go with lora_output.
    lora_embed: bool = False
    # ... and a full trainable change of these token-table rows (PEFT's "trainable tokens"; the train command picks
    # the ``lora_rows`` most frequent target tokens of the fine-tuning data, train config ``lora_rows``): a new
    # target language's frequent tokens get embeddings of their own, which a low-rank table adapter cannot give.
    lora_rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def fail(field: str, message: str) -> None:
            raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}: {message}")

        for field in ("vocab_size", "d_model", "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.d_kv is None:
            if self.d_model % self.num_heads:
                fail(
                    "num_heads",
                    f"does not divide d_model={self.d_model}; choose num_heads dividing d_model or set d_kv explicitly",
                )
        elif not isinstance(self.d_kv, int) or self.d_kv <= 0:
            fail("d_kv", "must be a positive integer or None (d_model // num_heads)")
        choices = {
            "mlp_activation": layers.MLP_ACTIVATIONS,
            "norm_type": NORM_TYPES,
            "norm_position": NORM_POSITIONS,
            "position_embedding": POSITION_EMBEDDINGS,
            "remat_policy": REMAT_POLICIES,
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "attention_kernel": layers.ATTENTION_KERNELS,
            "dropout_generator": layers.DROPOUT_GENERATORS,
            "init_scheme": INIT_SCHEMES,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                fail(field, f"is unknown; choose one of {', '.join(allowed)}")
        for field in ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate"):
            value = getattr(self, field)
            if not (value is None and field != "dropout_rate") and not (
                isinstance(value, (int, float)) and 0.0 <= value < 1.0
            ):
                fail(field, "must be in [0, 1)" + ("" if field == "dropout_rate" else " or None (= dropout_rate)"))
        if self.attention_kernel != "einsum" and self.attention_dropout > 0:
            fail(
                "attention_kernel",
                f"has no attention dropout; set attention_dropout_rate=0 (not {self.attention_dropout}) "
                "or use 'einsum'",
            )
        if self.attention_kernel == "cudnn" and self.dtype == "float32":
            fail("attention_kernel", "(cuDNN flash attention) needs dtype='bfloat16' or 'float16'")
        if self.attention_kernel == "cudnn" and (self.head_dim % 8 or self.head_dim > 256):
            fail(
                "attention_kernel", f"(cuDNN flash attention) needs d_kv a multiple of 8 up to 256, not {self.head_dim}"
            )
        try:
            quantization.check_scheme(self.quantization)
        except ValueError as error:
            fail("quantization", str(error))
        if self.share_layers and not self.scan_layers:
            fail("share_layers", "needs scan_layers=True (the shared layer is applied by nn.scan)")
        if self.quantization and self.scan_layers:
            fail("quantization", "is not supported with scan_layers=True; quantize the unscanned layout")
        try:
            quantization.check_scheme(self.qat)
        except ValueError as error:
            fail("qat", str(error))
        if self.qat and (self.quantization or self.scan_layers or self.lora_rank):
            fail("qat", "trains the unscanned float model (quantization='', scan_layers=False, lora_rank=0)")
        try:
            lora.check(self.lora_rank, self.lora_alpha)
        except ValueError as error:
            fail("lora_rank", str(error))
        if self.lora_rank and self.scan_layers:
            fail("lora_rank", "adapters need the unscanned model (scan_layers=False)")
        if self.lora_output and not self.lora_rank:
            fail("lora_output", "adds an adapter to the output projection: set lora_rank > 0 too")
        if self.lora_embed and not self.lora_rank:
            fail("lora_embed", "adds an adapter to the token tables: set lora_rank > 0 too")
        if self.lora_embed and self.lora_output and self.tie_word_embeddings:
            fail("lora_output", "the tied table's lora_embed adapter already adapts the output projection: drop one")
        if self.lora_rows:
            if not self.lora_rank:
                fail("lora_rows", "adds trainable token-table rows to LoRA: set lora_rank > 0 too")
            rows = self.lora_rows
            if not all(type(row) is int and 0 <= row < self.vocab_size for row in rows):
                fail("lora_rows", f"must be token ids in [0, vocab_size={self.vocab_size})")
            if len(set(rows)) != len(rows):
                fail("lora_rows", "names a row twice")
            if self.lora_output and self.tie_word_embeddings:
                fail("lora_output", "the tied table's lora_rows already adapt the output projection: drop one")
        if self.position_embedding == "relative":
            if self.relative_attention_num_buckets < 4:
                fail("relative_attention_num_buckets", "must be at least 4")
            if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
                fail("relative_attention_max_distance", "must exceed relative_attention_num_buckets // 4")

    @property
    def attention_dropout(self) -> float:
        """The rate on attention weights: ``attention_dropout_rate``, or ``dropout_rate`` when that is None."""
        return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

    @property
    def activation_dropout(self) -> float:
        """The rate on the MLP's hidden activations: ``activation_dropout_rate``, or ``dropout_rate``."""
        return self.dropout_rate if self.activation_dropout_rate is None else self.activation_dropout_rate

    @property
    def uses_dropout(self) -> bool:
        """Whether training draws any dropout mask (and so needs a dropout key)."""
        return max(self.dropout_rate, self.attention_dropout, self.activation_dropout) > 0

    @property
    def head_dim(self) -> int:
        """Per-head width: ``d_kv`` when set, else ``d_model // num_heads``."""
        return self.d_kv if self.d_kv is not None else self.d_model // self.num_heads

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TransformerConfig has no field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        if isinstance(values.get("lora_rows"), list):  # a tuple written to JSON (config.json) reads back as a list
            values = {**values, "lora_rows": tuple(values["lora_rows"])}
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the encoder and decoder stacks.
# --------------------------------------------------------------------------------------------------------------


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
    cls = layers.RMSNorm if cfg.norm_type == "rmsnorm" else layers.LayerNorm
    return cls(epsilon=cfg.layer_norm_epsilon, dtype=cfg.activation_dtype, param_dtype=cfg.parameter_dtype, name=name)


def _attention(cfg: TransformerConfig, name: str) -> layers.MultiHeadAttention:
    inits = {}
    if cfg.init_scheme == "fairseq":  # fairseq's MultiheadAttention.reset_parameters
        inits = dict(
            kernel_init=layers.xavier_uniform(1 / math.sqrt(2)),
            out_kernel_init=layers.xavier_uniform(),
            bias_init="fan_in_uniform",
        )
    return layers.MultiHeadAttention(
        num_heads=cfg.num_heads,
        d_kv=cfg.head_dim,
        dropout_rate=cfg.attention_dropout,
        scale_qk=cfg.scale_qk,
        use_bias=cfg.use_bias,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.parameter_dtype,
        kernel=cfg.attention_kernel,
        dropout_generator=cfg.dropout_generator,
        name=name,
        **inits,
    )


def _fused_mask(
    cfg: TransformerConfig,
    query_valid: jax.Array,
    key_valid: jax.Array,
    segment_ids: jax.Array | None,
    position_bias: jax.Array | None = None,
    causal: bool = False,
) -> layers.FusedMask:
    """The mask of the fused attention kernels: right padding as lengths; packed batches are refused."""
    if segment_ids is not None:
        raise ValueError(
            f"attention_kernel={cfg.attention_kernel!r} takes padded batches only, and this one is packed "
            "(it has segment ids); use attention_kernel='einsum' or turn packing off"
        )
    if (
        cfg.attention_kernel == "cudnn"
        and position_bias is not None
        and (query_valid.shape[1] % 2 or key_valid.shape[1] % 2)
    ):
        raise ValueError(
            f"attention_kernel='cudnn' with a relative-position bias needs even lengths, not {query_valid.shape[1]} "
            f"queries x {key_valid.shape[1]} keys; pad the batch to an even length or use attention_kernel='einsum'"
        )
    # An all-padding row (the pipelines fill a last partial batch with them) gets length 1, not 0: cuDNN is reported
    # to return NaN for empty rows, and such a row has no real position that its value could reach.
    return layers.FusedMask(
        query_lengths=jnp.maximum(query_valid.sum(axis=-1, dtype=jnp.int32), 1),
        key_lengths=jnp.maximum(key_valid.sum(axis=-1, dtype=jnp.int32), 1),
        position_bias=position_bias,
        causal=causal,
    )


def _mlp(cfg: TransformerConfig) -> layers.MlpBlock:
    inits = {}
    if cfg.init_scheme == "fairseq":  # fairseq's fc1 / fc2 are torch.nn.Linear with its default init
        inits = dict(kernel_init=layers.torch_linear_kernel_init, bias_init="fan_in_uniform")
    return layers.MlpBlock(
        d_ff=cfg.d_ff,
        activation=cfg.mlp_activation,
        dropout_rate=cfg.activation_dropout,
        dropout_generator=cfg.dropout_generator,
        use_bias=cfg.use_bias,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.parameter_dtype,
        name="mlp",
        **inits,
    )


def _dropout(cfg: TransformerConfig) -> layers.Dropout:
    """Residual and embedding dropout (``dropout_rate``)."""
    return layers.Dropout(rate=cfg.dropout_rate, generator=cfg.dropout_generator)


def _embed(cfg: TransformerConfig, name: str) -> layers.Embed:
    # Classic Transformers scale embeddings by sqrt(d_model) and so start them small (as fairseq does).
    stddev = cfg.d_model**-0.5 if cfg.scale_embeddings else 1.0
    return layers.Embed(
        num_embeddings=cfg.vocab_size,
        features=cfg.d_model,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.parameter_dtype,
        embedding_init=nn.initializers.normal(stddev=stddev),
        # QAT: PTQ quantizes the table when the tied output projection uses it; lookups then read int8 rows
        qat=cfg.qat if cfg.qat and cfg.quantize_embeddings and cfg.tie_word_embeddings else "",
        lora_rank=cfg.lora_rank if cfg.lora_embed else 0,
        lora_scale=lora.scale(cfg.lora_rank, cfg.lora_alpha) if cfg.lora_embed else 1.0,
        lora_rows=cfg.lora_rows,
        name=name,
    )


def _sublayer(cfg: TransformerConfig, x: jax.Array, norm: nn.Module, fn, dropout: layers.Dropout, deterministic: bool):
    """Residual sublayer: pre-LN ``x + drop(fn(norm(x)))`` or post-LN ``norm(x + drop(fn(x)))``."""
    if cfg.norm_position == "pre":
        return x + dropout(fn(norm(x)), deterministic=deterministic)
    return norm(x + dropout(fn(x), deterministic=deterministic))


def _norm_name(cfg: TransformerConfig, what: str) -> str:
    return f"{cfg.norm_position}_{what}_layer_norm"


def _remat_policy(name: str):
    return {"minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, "full": None}[name]


def _stack(
    cfg: TransformerConfig,
    layer_cls: type[nn.Module],
    num_layers: int,
    num_broadcast_args: int,
    static_argnums: tuple[int, ...],
    decode: bool,
):
    """Layer constructor for a stack: optionally rematerialized and scanned (one ``layers`` module, stacked
    parameters with a leading ``layers`` axis) or unscanned (``layers_0``, ``layers_1``, ...)."""
    if cfg.remat_policy != "none" and not decode:
        layer_cls = nn.remat(
            layer_cls,
            policy=_remat_policy(cfg.remat_policy),
            static_argnums=static_argnums,
            prevent_cse=not cfg.scan_layers,
        )
    if not cfg.scan_layers:
        return [functools.partial(layer_cls, config=cfg, name=f"layers_{i}") for i in range(num_layers)]
    if cfg.share_layers:  # one set of parameters, broadcast to every step; each layer still has its own cache
        scanned = nn.scan(
            layer_cls,
            variable_axes={"cache": 0},
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(nn.broadcast,) * num_broadcast_args,
            length=num_layers,
        )
        return [functools.partial(scanned, config=cfg, scanned=True, name="layers")]
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast_args,  # every argument after the carry
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return [functools.partial(scanned, config=cfg, scanned=True, name="layers")]


def _add_positions(cfg: TransformerConfig, x: jax.Array, positions: jax.Array | None, stepping: bool = False):
    """Absolute position embeddings; ``positions`` None means 0..length-1 in every row. Outside step-by-step
    decoding a position indexes a token of its row (so it is < length) and sinusoids come from a host table."""
    if cfg.position_embedding == "sinusoidal":
        if stepping:
            encoding = layers.sinusoidal_positions(positions, cfg.d_model)
        else:
            table = jnp.asarray(layers.sinusoidal_table(x.shape[1], cfg.d_model))
            encoding = table[None] if positions is None else jnp.take(table, positions, axis=0)
        return x + encoding.astype(x.dtype)
    if cfg.position_embedding == "learned":
        table = layers.Embed(
            num_embeddings=cfg.max_position_embeddings,
            features=cfg.d_model,
            axes=("abspos_buckets", "embed"),
            dtype=cfg.activation_dtype,
            param_dtype=cfg.parameter_dtype,
            embedding_init=nn.initializers.normal(stddev=cfg.d_model**-0.5),
            name="position_embedder",
        )
        return x + table(_default_positions(x[..., 0]) if positions is None else positions)
    return x


def _relpos_bias(cfg: TransformerConfig, bidirectional: bool) -> layers.RelativePositionBiases:
    """The stack's one relative-position table (``relpos_bias``), shared by all of its layers."""
    return layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads,
        bidirectional=bidirectional,
        dtype=jnp.float32,
        param_dtype=cfg.parameter_dtype,
        name="relpos_bias",
    )


def _default_positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


# --------------------------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Self-attention and MLP sublayers; ``scanned`` makes it return ``(x, None)`` for nn.scan."""

    config: TransformerConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, deterministic: bool = True):
        cfg = self.config
        dropout = _dropout(cfg)
        attention = _attention(cfg, "attention")
        x = _sublayer(
            cfg,
            x,
            _norm(cfg, _norm_name(cfg, "attention")),
            lambda h: attention(h, h, attention_bias, deterministic=deterministic),
            dropout,
            deterministic,
        )
        mlp = _mlp(cfg)
        x = _sublayer(
            cfg, x, _norm(cfg, _norm_name(cfg, "mlp")), lambda h: mlp(h, deterministic), dropout, deterministic
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, and MLP sublayers."""

    config: TransformerConfig
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        self_attention_bias: jax.Array,
        cross_attention_bias: jax.Array,
        deterministic: bool = True,
        decode: bool = False,
        decode_index: jax.Array | None = None,
    ):
        cfg = self.config
        dropout = _dropout(cfg)
        self_attention = _attention(cfg, "self_attention")
        cross_attention = _attention(cfg, "encoder_decoder_attention")

        def attend_self(h):
            return self_attention(
                h, h, self_attention_bias, deterministic=deterministic, decode=decode, decode_index=decode_index
            )

        def attend_encoder(h):
            return cross_attention(
                h, encoded, cross_attention_bias, deterministic=deterministic, decode=decode, is_cross_attention=True
            )

        x = _sublayer(cfg, x, _norm(cfg, _norm_name(cfg, "self_attention")), attend_self, dropout, deterministic)
        x = _sublayer(cfg, x, _norm(cfg, _norm_name(cfg, "cross_attention")), attend_encoder, dropout, deterministic)
        mlp = _mlp(cfg)
        x = _sublayer(
            cfg, x, _norm(cfg, _norm_name(cfg, "mlp")), lambda h: mlp(h, deterministic), dropout, deterministic
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


# --------------------------------------------------------------------------------------------------------------
# Stacks.
# --------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Token (+ position) embedding, ``num_encoder_layers`` layers, final norm (pre-LN) and dropout."""

    config: TransformerConfig
    shared_embedding: nn.Module | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        embed = self.shared_embedding if self.shared_embedding is not None else _embed(cfg, "token_embedder")
        x = embed(tokens.astype(jnp.int32))
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        x = _add_positions(cfg, x, positions)
        dropout = _dropout(cfg)
        x = dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        valid = tokens > 0
        position_bias = None
        if cfg.position_embedding == "relative":
            position_bias = _relpos_bias(cfg, bidirectional=True)(tokens.shape[1], tokens.shape[1])
        if cfg.attention_kernel != "einsum":
            bias = _fused_mask(cfg, valid, valid, segment_ids, position_bias)
        else:
            bias = layers.attention_mask_bias(valid, valid, segment_ids, segment_ids)
            bias = bias if position_bias is None else bias + position_bias

        for layer in _stack(cfg, EncoderLayer, cfg.num_encoder_layers, 2, static_argnums=(3,), decode=False):
            x = layer()(x, bias, deterministic)
            x = x[0] if cfg.scan_layers else x
        if cfg.norm_position == "pre":
            x = _norm(cfg, "encoder_norm")(x)
            x = dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _beam_self_attention_bias(beam_source: jax.Array, key_positions: jax.Array, index: jax.Array) -> jax.Array:
    """Self-attention bias [examples, 1, beams, length x beams] of a beam-search step over the slot-major cache
    (``init_decode_cache(beams=...)``): beam q sees, at each earlier position j, the keys of the slot
    ``beam_source[example, q, j]`` that held its ancestor then, and at the current position its own keys."""
    examples, beams, length = beam_source.shape
    slot = jnp.arange(beams, dtype=beam_source.dtype)
    earlier = (key_positions < index)[None, None, :, None]
    current = (key_positions == index)[None, None, :, None]
    allowed = (earlier & (beam_source[..., None] == slot)) | (current & (slot[:, None, None] == slot)[None])
    bias = jnp.where(allowed, 0.0, layers.NEG_INF).astype(jnp.float32)  # [examples, beams, length, slots]
    return bias.reshape(examples, 1, beams, length * beams)


class Decoder(nn.Module):
    """Embedding, ``num_decoder_layers`` layers, final norm, and the output projection to vocabulary logits.

    With ``decode=True`` the first call (on a [batch, max_length] dummy target) creates the key/value cache;
    later calls take one token per row, [batch, 1], and advance the cache by one position.
    """

    config: TransformerConfig
    shared_embedding: nn.Module | None = None

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        cfg = self.config
        batch, length = decoder_input_tokens.shape
        embed = self.shared_embedding if self.shared_embedding is not None else _embed(cfg, "token_embedder")
        encoder_valid = encoder_input_tokens > 0

        stepping = decode and self.has_variable("cache", "cache_index")
        if stepping:
            # One new token per row at position ``index`` of the cache.
            index_var = self.variable("cache", "cache_index")
            key_positions = self.get_variable("cache", "key_positions")
            index = index_var.value
            index_var.value = index + 1
            positions = jnp.full((batch, length), index, jnp.int32)
            position_bias = None
            if cfg.position_embedding == "relative":
                position_bias = _relpos_bias(cfg, bidirectional=False)(index[None], key_positions.shape[0])
            if self.has_variable("cache", "beam_source"):
                self_bias = _beam_self_attention_bias(self.get_variable("cache", "beam_source"), key_positions, index)
                if position_bias is not None:  # the same for every slot of a position
                    self_bias = self_bias + jnp.repeat(position_bias, self_bias.shape[-1] // key_positions.shape[0], -1)
            else:
                self_bias = jnp.where(key_positions[None, None, None, :] <= index, 0.0, layers.NEG_INF)
                self_bias = self_bias.astype(jnp.float32)
                if position_bias is not None:
                    self_bias = self_bias + position_bias
            cross_bias = jnp.where(encoder_valid, 0.0, layers.NEG_INF).astype(jnp.float32)[:, None, None, :]
        else:
            if decode:  # cache-creating call
                self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
                self.variable("cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32))
            index = None
            positions = decoder_positions
            decoder_valid = (
                decoder_target_tokens > 0 if decoder_target_tokens is not None else jnp.ones((batch, length), bool)
            )
            position_bias = None
            if cfg.position_embedding == "relative":
                position_bias = _relpos_bias(cfg, bidirectional=False)(length, length)
            if cfg.attention_kernel != "einsum" and not decode:
                segments = decoder_segment_ids if decoder_segment_ids is not None else encoder_segment_ids
                self_bias = _fused_mask(cfg, decoder_valid, decoder_valid, segments, position_bias, causal=True)
                cross_bias = _fused_mask(cfg, decoder_valid, encoder_valid, segments)
            else:
                self_bias = layers.attention_mask_bias(
                    decoder_valid, decoder_valid, decoder_segment_ids, decoder_segment_ids, causal=True
                )
                cross_bias = layers.attention_mask_bias(
                    decoder_valid, encoder_valid, decoder_segment_ids, encoder_segment_ids
                )
                self_bias = self_bias if position_bias is None else self_bias + position_bias

        x = embed(decoder_input_tokens.astype(jnp.int32))
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        x = _add_positions(cfg, x, positions, stepping=stepping)
        dropout = _dropout(cfg)
        x = dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        for layer in _stack(cfg, DecoderLayer, cfg.num_decoder_layers, 6, static_argnums=(5, 6), decode=decode):
            x = layer()(x, encoded, self_bias, cross_bias, deterministic, decode, index)
            x = x[0] if cfg.scan_layers else x
        if cfg.norm_position == "pre":
            x = _norm(cfg, "decoder_norm")(x)
            x = dropout(x, deterministic=deterministic)

        if cfg.rescale_logits:
            x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
        if return_hidden:  # what the output projection would take (losses.projected_cross_entropy)
            return x
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers.DenseGeneral(
                cfg.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=cfg.activation_dtype,
                param_dtype=cfg.parameter_dtype,
                kernel_init=(
                    nn.initializers.normal(stddev=cfg.d_model**-0.5)  # fairseq's output_projection
                    if cfg.init_scheme == "fairseq"
                    else layers.default_kernel_init
                ),
                name="logits_dense",
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class Transformer(nn.Module):
    """Encoder-decoder Transformer: ``__call__`` for teacher forcing, ``encode``/``decode`` for decoding."""

    config: TransformerConfig

    def setup(self) -> None:
        cfg = self.config
        shared = _embed(cfg, "token_embedder") if cfg.share_embeddings else None
        self.encoder = Encoder(cfg, shared_embedding=shared)
        self.decoder = Decoder(cfg, shared_embedding=shared)

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        enable_dropout: bool = False,
    ) -> jax.Array:
        """Encoder outputs [batch, input_len, d_model]."""
        return self.encoder(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic=not enable_dropout
        )

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        enable_dropout: bool = False,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Logits [batch, target_len, vocab] (float32) given the encoder outputs; with ``return_hidden`` the
        activations the output projection takes instead ([batch, target_len, d_model])."""
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            deterministic=not enable_dropout,
            decode=decode,
            return_hidden=return_hidden,
        )

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        enable_dropout: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits [batch, target_len, vocab] (float32), or with ``return_hidden`` the activations
        that ``output_projection`` maps to them."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout)
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout,
            return_hidden=return_hidden,
        )


def build_model(cfg: TransformerConfig) -> nn.Module:
    """The network of ``cfg``: the Transformer, or with ``cfg.quantization`` its Qwix-quantized twin (same
    methods, same parameter paths, quantized weights), or with ``cfg.lora_rank`` its twin with LoRA adapters."""
    model = Transformer(cfg)
    if cfg.lora_rank:  # with cfg.quantization: QLoRA, the base applied quantized
        return lora.wrap(
            model, cfg.lora_rank, cfg.lora_alpha, cfg.quantization, cfg.quantize_embeddings, output=cfg.lora_output
        )
    if cfg.qat:
        return quantization.wrap_qat(model, cfg.qat, cfg.quantize_embeddings)
    return quantization.wrap(model, cfg.quantization, cfg.quantize_embeddings) if cfg.quantization else model


# --------------------------------------------------------------------------------------------------------------
# Functional helpers: init, shapes, parameter counts, layout conversion, cache.
# --------------------------------------------------------------------------------------------------------------


def _dummy_inputs(batch: int = 1, input_length: int = 8, target_length: int = 8):
    return jnp.ones((batch, input_length), jnp.int32), jnp.ones((batch, target_length), jnp.int32)


def init_variables(cfg: TransformerConfig, rng: jax.Array, encoder_tokens: jax.Array, decoder_tokens: jax.Array):
    """``Transformer(cfg).init`` on dummy tokens. The parameters do not depend on the attention kernel, so the init
    traces the einsum path: shapes and initial values then come out on any backend, a cuDNN config's on a CPU too."""
    model = Transformer(cfg.replace(attention_kernel="einsum"))
    if cfg.lora_rank:  # the adapters are created by Qwix's interception, on the wrapped model's first call
        model = lora.wrap(model, cfg.lora_rank, cfg.lora_alpha, output=cfg.lora_output)
    return model.init(rng, encoder_tokens, decoder_tokens)


def initializer(cfg: TransformerConfig, encoder_tokens: jax.Array, decoder_tokens: jax.Array):
    """The function ``rng -> parameters`` (plain arrays) that ``init_params`` and ``init_params_sharded`` compile.

    With ``cfg.init_through_scan`` and unscanned layers it initializes the scanned twin of the model and unstacks
    its layers: each parameter keeps its shape and initializer (fan-in and fan-out are per layer either way), the
    embeddings, norms and position tables keep their values, and the layers draw from one stacked key per parameter
    instead of one key each, so XLA compiles one layer's random initializers instead of one copy per layer.
    """
    if cfg.lora_rank and cfg.quantization:  # QLoRA: the float base quantized as it is held in training
        float_init = initializer(cfg.replace(quantization=""), encoder_tokens, decoder_tokens)
        base_abstract = quantized_abstract_params(without_lora(cfg))

        def quantized_init(rng: jax.Array) -> Any:
            params = float_init(rng)
            base = quantization.quantize_params(lora.without_adapters(params), base_abstract)
            return lora.with_adapters(quantization.to_storage(base), params)

        return quantized_init
    if cfg.init_through_scan and not cfg.scan_layers and not cfg.lora_rank:
        twin = cfg.replace(scan_layers=True)
        return lambda rng: unscan_params(
            nn.meta.unbox(init_variables(twin, rng, encoder_tokens, decoder_tokens)["params"]), cfg
        )
    return lambda rng: nn.meta.unbox(init_variables(cfg, rng, encoder_tokens, decoder_tokens)["params"])


def init_params(cfg: TransformerConfig, rng: jax.Array, input_length: int = 8, target_length: int = 8) -> Any:
    """Initialized parameters (plain arrays, logical-axis boxes removed)."""
    encoder_tokens, decoder_tokens = _dummy_inputs(1, input_length, target_length)
    return jax.jit(initializer(cfg, encoder_tokens, decoder_tokens))(rng)


def abstract_params(cfg: TransformerConfig) -> Any:
    """Shapes and dtypes of the parameters, as boxed ``ShapeDtypeStruct``s, computed without materializing."""
    encoder_tokens, decoder_tokens = _dummy_inputs()
    return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0), encoder_tokens, decoder_tokens))["params"]


def quantized_abstract_params(cfg: TransformerConfig) -> Any:
    """For a ``cfg.quantization`` model: the Qwix parameter tree (``WithAux[QArray]`` leaves, shapes only)."""
    if not cfg.quantization:
        raise ValueError("quantized_abstract_params needs a config with quantization set")
    if cfg.lora_rank:  # QLoRA: Qwix's tree of the quantized base, and the adapters (float) next to their weights
        base = quantization.abstract_params(build_model(without_lora(cfg)), _dummy_inputs())
        return lora.with_adapters(base, quantization.unbox_shapes(abstract_params(cfg)))
    return quantization.abstract_params(build_model(cfg), _dummy_inputs())


def without_lora(cfg: TransformerConfig) -> TransformerConfig:
    """``cfg``'s base model: the same network without LoRA adapters (a QLoRA model's stays quantized)."""
    return cfg.replace(lora_rank=0, lora_alpha=None, lora_output=False, lora_embed=False, lora_rows=())


def stored_params(cfg: TransformerConfig) -> Any:
    """Shapes and dtypes of the parameters as training holds them (``ShapeDtypeStruct``s): the float tree, or for
    QLoRA each quantized base weight a ``{"qvalue", "scale"}`` dict (``quantization.to_storage``)."""
    encoder_tokens, decoder_tokens = _dummy_inputs()
    return jax.eval_shape(initializer(cfg, encoder_tokens, decoder_tokens), jax.random.key(0))


def runtime_params(cfg: TransformerConfig, params: Any) -> Any:
    """``params`` as ``build_model(cfg)`` applies them: a QLoRA model's stored ``{"qvalue", "scale"}`` dicts become
    Qwix's quantized weights again; anything else (float trees, already rebuilt ones) is returned as it is."""
    if not (cfg.quantization and quantization.holds_quantized(params)):
        return params
    if not cfg.scan_layers and "layers" in params.get("encoder", {}):  # t5x_lite.quantize's stacked layout
        params = unscan_params(params, cfg)
    # Qwix's tree of the quantized base (computed without adapters: Qwix cannot build a LoRA model's abstract tree
    # under a mesh), then the adapters, which are plain arrays, put back
    base = quantization.from_storage(params, quantized_abstract_params(without_lora(cfg)))
    return lora.with_adapters(base, params) if cfg.lora_rank else base


def quantized_for_disk(cfg: TransformerConfig, quantized: Any) -> Any:
    """What ``t5x_lite.quantize`` saves: the ``to_storage`` tree with each stack's layers stacked into one ``layers``
    entry (leading layer axis), so that the checkpoint holds one array per weight kind instead of one per layer.
    Orbax writes about 1 KB of metadata per array, which was 3 to 4% of a small int8 model's checkpoint
    (Transformer-tiny: 234 arrays). ``runtime_params`` unstacks it."""
    return scan_params(quantization.to_storage(quantized), cfg)


def lora_base_params(model_cfg: TransformerConfig, params: Any, source: str) -> Any:
    """An ``init_from`` base model's parameters as a LoRA run holds them: float, or for QLoRA quantized and stored
    as ``{"qvalue", "scale"}`` dicts (a float base is quantized here; a ``t5x_lite.quantize`` workdir of the same
    scheme is taken as it is)."""
    if quantization.is_quantized_tree(params):
        if not model_cfg.quantization:
            raise ValueError(f"{source} is quantized: LoRA on it needs the same --config.quantization (QLoRA)")
        stored = quantization.to_storage(params)
        expected = quantization.SCHEMES[model_cfg.quantization][0]
        flat = jax.tree_util.tree_flatten_with_path(stored)[0]
        found = {str(leaf.dtype) for path, leaf in flat if getattr(path[-1], "key", None) == "qvalue"}
        if found != {jnp.dtype(expected).name}:
            raise ValueError(
                f"{source} is quantized to {', '.join(sorted(found))}; --config.quantization="
                f"{model_cfg.quantization} needs {jnp.dtype(expected).name}: quantize its float source with that scheme"
            )
        return stored
    check_params_match(without_lora(model_cfg).replace(quantization=""), params, source=source)
    if not model_cfg.quantization:
        return params
    base_cfg = without_lora(model_cfg)
    return quantization.to_storage(quantization.quantize_params(params, quantized_abstract_params(base_cfg)))


def param_logical_axes(cfg: TransformerConfig) -> Any:
    """PartitionSpec of logical axis names for every parameter (used by partitioning.py)."""
    return nn.get_partition_spec(abstract_params(cfg))


def count_params(cfg: TransformerConfig) -> int:
    """Number of parameters, counted from shapes only (works for 11B models on a laptop)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(cfg))))


def check_params_match(cfg: TransformerConfig, params: Any, source: str = "the checkpoint") -> None:
    """Raise a one-line ValueError naming the config field when ``params`` do not fit ``cfg``."""
    expected = {"/".join(k): v.shape for k, v in _flatten(nn.meta.unbox(abstract_params(cfg))).items()}
    actual = {"/".join(k): np.shape(v) for k, v in _flatten(params).items()}
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {extra[0]}"
        raise ValueError(
            f"{source} does not fit TransformerConfig: it {what} "
            "(check num_encoder_layers, num_decoder_layers, scan_layers, tie_word_embeddings, share_embeddings, "
            "mlp_activation, norm_type, norm_position, position_embedding, use_bias)"
        )
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            field = _field_for_mismatch(cfg, name, shape, actual[name])
            raise ValueError(
                f"TransformerConfig.{field}={getattr(cfg, field)!r} does not match {source}: "
                f"{name} has shape {tuple(actual[name])}, the config gives {tuple(shape)}"
            )


def _field_for_mismatch(cfg: TransformerConfig, name: str, expected: tuple, actual: tuple) -> str:
    """The config field most likely responsible for a shape mismatch of parameter ``name``."""
    values = {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    layers_field = "num_decoder_layers" if name.startswith("decoder") else "num_encoder_layers"
    stacked = cfg.scan_layers and not cfg.share_layers and "/layers/" in f"/{name}/"  # one entry per layer
    if stacked and len(expected) and len(actual) and expected[0] != actual[0]:
        return layers_field
    for dim_expected, dim_actual in zip(expected, actual, strict=False):
        if dim_expected != dim_actual:
            if "token_embedder" in name or "logits_dense" in name:
                return "vocab_size" if dim_expected == cfg.vocab_size else "d_model"
            if "relpos" in name:
                return "num_heads" if dim_expected == cfg.num_heads else "relative_attention_num_buckets"
            if "position_embedder" in name:
                return "max_position_embeddings" if dim_expected == cfg.max_position_embeddings else "d_model"
            for field in ("d_model", "d_ff", "num_heads", "d_kv"):
                if dim_expected == values[field]:
                    return field
    return "d_model"


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def scan_params(params: Any, cfg: TransformerConfig) -> Any:
    """Unscanned layout (``layers_0``, ``layers_1`` ...) -> scanned (``layers`` with a leading layer axis)."""
    if cfg.share_layers:
        raise ValueError("share_layers=True models have one layer per stack, not a per-layer layout to convert")
    from flax import traverse_util

    out = dict(params)
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        stack_params = dict(params[stack])
        per_layer = [stack_params.pop(f"layers_{i}") for i in range(n)]
        flat = [traverse_util.flatten_dict(p) for p in per_layer]
        stacked = {k: jnp.stack([f[k] for f in flat]) for k in flat[0]}
        stack_params["layers"] = traverse_util.unflatten_dict(stacked)
        out[stack] = stack_params
    return out


def unscan_params(params: Any, cfg: TransformerConfig) -> Any:
    """Scanned layout -> unscanned layout (inverse of ``scan_params``)."""
    if cfg.share_layers:
        raise ValueError("share_layers=True models have one layer per stack, not a per-layer layout to convert")
    out = dict(params)
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        stack_params = dict(params[stack])
        stacked = stack_params.pop("layers")
        for i in range(n):
            stack_params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[stack] = stack_params
    return out


def output_projection(cfg: TransformerConfig, params: Any) -> jax.Array | None:
    """The [d_model, vocab] matrix that maps the decoder's last activations to logits: the (shared or decoder)
    token embedding transposed when tied, else the ``logits_dense`` kernel. None when the model's own projection
    computes more than that matrix: quantized, fake-quantized (QAT) or with an output adapter (``lora_output``)."""
    if cfg.quantization or cfg.qat or cfg.lora_output:
        return None
    if not cfg.tie_word_embeddings:
        return params["decoder"]["logits_dense"]["kernel"]
    table = params["token_embedder"] if cfg.share_embeddings else params["decoder"]["token_embedder"]
    embedding = table["embedding"]
    if cfg.lora_embed:  # the adapted table, as Embed.attend computes with it
        embedding = embedding + table["embedding_lora_a"] @ table["embedding_lora_b"] * lora.scale(
            cfg.lora_rank, cfg.lora_alpha
        )
    if cfg.lora_rows:
        embedding = embedding + layers.row_changes(table["embedding_lora_rows"], cfg.lora_rows, cfg.vocab_size)
    return embedding.T


def init_decode_cache(
    cfg: TransformerConfig,
    params: Any,
    encoded: jax.Array,
    encoder_input_tokens: jax.Array,
    max_decode_length: int,
    beams: int | None = None,
) -> Any:
    """Key/value cache for ``max_decode_length`` steps, with the cross-attention keys/values of ``encoded``.

    ``beams`` (beam search, even 1): each example's self-attention cache row holds ``beams`` slots per position
    (``[examples, heads, d_kv, length x beams]``, position-major), and ``decoder/beam_source`` [examples, beams,
    length] says which slot holds each live beam's ancestor at every earlier position (``advance_beams``). The
    decode steps then take ``examples x beams`` rows, and a beam's history never moves in memory.
    """
    batch = encoded.shape[0]
    _, variables = build_model(cfg).apply(
        {"params": runtime_params(cfg, params)},
        encoded,
        encoder_input_tokens,
        jnp.zeros((batch, max_decode_length), jnp.int32),
        decode=True,
        method="decode",
        mutable=["cache"],
    )
    cache = variables["cache"]
    if beams is None:
        return cache
    if beams < 1:
        raise ValueError(f"beams={beams} must be at least 1")

    def widen(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        if "encoder_decoder_attention" in names or names[-1] not in ("cached_key", "cached_value"):
            return leaf
        # keys [..., d_kv, length], values [..., length, d_kv]
        axis = leaf.ndim - 1 if names[-1] == "cached_key" else leaf.ndim - 2
        shape = list(leaf.shape)
        shape[axis] *= beams
        return jnp.zeros(shape, leaf.dtype)

    cache = jax.tree_util.tree_map_with_path(widen, cache)
    decoder = dict(cache["decoder"])
    decoder["beam_source"] = jnp.zeros((batch, beams, max_decode_length), jnp.int32)
    return {**cache, "decoder": decoder}


def advance_beams(cache: Any, parent: jax.Array, position: jax.Array) -> Any:
    """After a beam-search step at ``position``: the live beams are now the continuations of the slots ``parent``
    [examples, beams]. Only the small ``beam_source`` table is reordered; the key/value caches stay in place."""
    source = cache["decoder"]["beam_source"]
    examples, beams, _ = source.shape
    own = jnp.broadcast_to(jnp.arange(beams, dtype=source.dtype)[None, :, None], (examples, beams, 1))
    source = jax.lax.dynamic_update_slice(source, own, (0, 0, position))  # each slot wrote this position itself
    source = jnp.take_along_axis(source, parent[:, :, None].astype(source.dtype), axis=1)
    return {**cache, "decoder": {**cache["decoder"], "beam_source": source}}


def decode_step(
    cfg: TransformerConfig,
    params: Any,
    cache: Any,
    encoded: jax.Array,
    encoder_input_tokens: jax.Array,
    tokens: jax.Array,
    projection: jax.Array | None = None,
):
    """Logits [batch, vocab] of the next token after feeding ``tokens`` [batch] at the cache's position.

    ``projection``: ``output_projection(cfg, params)``, made once before a decoding loop. A tied model's logits
    then come from that row-major [d_model, vocab] copy instead of the [vocab, d_model] table: the same products,
    and about 1.3x faster per step on a CPU, where the table is read from memory at every step.
    """
    hidden, variables = build_model(cfg).apply(
        {"params": runtime_params(cfg, params), "cache": cache},
        encoded,
        encoder_input_tokens,
        tokens[:, None],
        decode=True,
        return_hidden=projection is not None,
        method="decode",
        mutable=["cache"],
    )
    if projection is None:
        return hidden[:, 0], variables["cache"]
    dtype = cfg.activation_dtype
    logits = jnp.dot(hidden[:, 0].astype(dtype), projection.astype(dtype)).astype(jnp.float32)
    return logits, variables["cache"]
