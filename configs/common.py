"""Model-size presets (``get_model_config('t5_v1_1_base', dropout_rate=0.0)`` -> TransformerConfig) and the
default training config that experiment configs override.

T5 v1.0 (``t5_small`` ... ``t5_xxl``) and T5 v1.1 (``t5_v1_1_small`` ... ``t5_v1_1_xxl``) match the published
Hugging Face configs (google-t5/t5-*, google/t5-v1_1-*) layer for layer, so converted checkpoints load into them;
``transformer_*`` are the classic Transformer of Vaswani et al. (2017) and Wu et al. (2021)'s Multi30k baseline.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from t5x_lite.network import TransformerConfig

T5_VOCAB_SIZE = 32128  # the T5 SentencePiece vocabulary (32,000 pieces + 100 sentinels), padded to a multiple of 128

# init_through_scan: the T5 presets (6 to 24 layers a stack) compile one layer's initializers, not one per layer.
_T5 = dict(vocab_size=T5_VOCAB_SIZE, init_through_scan=True)
_T5_V1_0 = dict(_T5, mlp_activation="relu", tie_word_embeddings=True, rescale_logits=True)
_T5_V1_1 = dict(_T5, mlp_activation="gated-gelu", tie_word_embeddings=False, rescale_logits=False)


def _layers(n: int) -> dict[str, int]:
    return dict(num_encoder_layers=n, num_decoder_layers=n)


_CLASSIC = dict(
    norm_type="layernorm",
    norm_position="post",
    layer_norm_epsilon=1e-5,
    position_embedding="sinusoidal",
    scale_qk=True,
    scale_embeddings=True,
    use_bias=True,
    mlp_activation="relu",
    share_embeddings=True,
    tie_word_embeddings=True,
    rescale_logits=False,
    # fairseq's `transformer` (and Vaswani et al.'s P_drop): dropout on embeddings and sublayer outputs only.
    attention_dropout_rate=0.0,
    activation_dropout_rate=0.0,
    init_scheme="fairseq",  # Xavier attention and torch-default MLP weights: T5's fan-in init learns far slower here
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny T5 for tests and demos: every code path of v1.1 at a few thousand parameters per layer.
    "t5_tiny": dict(
        _T5_V1_1, vocab_size=512, d_model=64, num_heads=4, d_kv=16, d_ff=128, **_layers(2), init_through_scan=False
    ),
    # T5 v1.0 (Raffel et al. 2020): ReLU MLP, tied and rescaled output.
    "t5_small": dict(_T5_V1_0, d_model=512, num_heads=8, d_kv=64, d_ff=2048, **_layers(6)),
    "t5_base": dict(_T5_V1_0, d_model=768, num_heads=12, d_kv=64, d_ff=3072, **_layers(12)),
    "t5_large": dict(_T5_V1_0, d_model=1024, num_heads=16, d_kv=64, d_ff=4096, **_layers(24)),
    "t5_xl": dict(_T5_V1_0, d_model=1024, num_heads=32, d_kv=128, d_ff=16384, **_layers(24)),  # "t5-3b"
    "t5_xxl": dict(_T5_V1_0, d_model=1024, num_heads=128, d_kv=128, d_ff=65536, **_layers(24)),  # "t5-11b"
    # T5 v1.1 (and mT5 shapes but vocabulary): gated-GELU MLP, untied output projection, no rescale.
    "t5_v1_1_small": dict(_T5_V1_1, d_model=512, num_heads=6, d_kv=64, d_ff=1024, **_layers(8)),
    "t5_v1_1_base": dict(_T5_V1_1, d_model=768, num_heads=12, d_kv=64, d_ff=2048, **_layers(12)),
    "t5_v1_1_large": dict(_T5_V1_1, d_model=1024, num_heads=16, d_kv=64, d_ff=2816, **_layers(24)),
    "t5_v1_1_xl": dict(_T5_V1_1, d_model=2048, num_heads=32, d_kv=64, d_ff=5120, **_layers(24)),
    "t5_v1_1_xxl": dict(_T5_V1_1, d_model=4096, num_heads=64, d_kv=64, d_ff=10240, **_layers(24)),
    # Wu et al. (ACL 2021) text-only Multi30k baseline (fairseq transformer_tiny): 4+4 layers, all embeddings shared.
    "transformer_tiny": dict(_CLASSIC, d_model=128, num_heads=4, d_ff=256, dropout_rate=0.3, **_layers(4)),
    # Vaswani et al. (2017), Table 3: base and big (dropout 0.3 for big En-De).
    "transformer_base": dict(_CLASSIC, d_model=512, num_heads=8, d_ff=2048, dropout_rate=0.1, **_layers(6)),
    "transformer_big": dict(_CLASSIC, d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3, **_layers(6)),
}

# Short aliases a researcher types on the command line.
ALIASES = {"t5_3b": "t5_xl", "t5_11b": "t5_xxl"}


def get_model_config(name: str, **overrides: Any) -> TransformerConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``vocab_size`` of the task's vocabulary)."""
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return TransformerConfig.from_dict({**PRESETS[name], **overrides})


def hf_t5_config(name: str) -> dict[str, Any]:
    """The Hugging Face ``T5Config`` keyword arguments of a T5 preset (used to check parameter counts)."""
    from t5x_lite.convert import hf_config_from

    cfg = get_model_config(name)
    hf = hf_config_from(cfg)
    hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    return hf


def parse_options(arg: str | None, defaults: dict[str, Any], config_file: str) -> dict[str, Any]:
    """``'steps=500,batch_size=32'`` -> ``defaults`` updated with typed values (big_vision style config args)."""
    options = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in options:
            raise ValueError(f"{config_file}: unknown option {key!r}; known: {', '.join(options)}")
        options[key] = type(defaults[key])(value)
    return options


def default_train_config() -> ml_collections.ConfigDict:
    """Every key ``t5x_lite.train`` reads, with defaults; experiment configs override what they change."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "synthetic_numbers"
    config.data_dir = ""  # local corpora; empty: $T5X_LITE_DATA or ../shared/data
    config.vocab_cache_dir = ""  # empty: ~/.cache/t5x_lite/vocab
    config.compilation_cache_dir = ""  # compiled programs kept for restarts; empty: ~/.cache/t5x_lite/xla; "none": off
    config.pack = True
    config.prefetch_batches = 2  # batches prepared ahead on a background thread
    # batch_tokens > 0: length-bucketed batches of at most that many padded tokens (fairseq's --max-tokens)
    # instead of batch_size rows of the task's full length; needs pack=False and a seq2seq task.
    config.batch_tokens = 0
    config.bucket_boundaries = ()  # padded lengths of the buckets; empty: bucketing.default_boundaries
    config.bucket_row_multiple = 8  # rows of every bucketed batch are a multiple of this (and of the batch shards)

    config.model = "t5_tiny"
    config.model_overrides = ml_collections.ConfigDict({"dropout_rate": 0.0})

    config.num_train_steps = 600
    config.batch_size = 64
    config.num_microbatches = 1
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.schedule = "cosine"
    config.warmup_steps = 200
    config.decay_steps = 600
    config.end_factor = 0.05
    config.weight_decay = 0.01
    config.b2 = 0.98
    config.eps = 1e-9
    config.grad_clip_norm = 1.0
    config.label_smoothing = 0.0
    config.z_loss = 0.0
    config.loss_chunk_tokens = 0  # > 0: output projection + loss fused, this many tokens at a time (no logits held)

    config.mesh_shape = (-1, 1, 1)
    config.partitioning = "data_parallel"

    config.log_every_steps = 100
    config.eval_every_steps = 600
    config.eval_split = "test"
    config.eval_examples = 1000  # 0 = the whole split
    config.eval_batch_size = 250
    config.checkpoint_every_steps = 300
    config.keep_checkpoints = 2  # the last K ...
    config.keep_best_checkpoints = 0  # ... plus the best K by best_metric (saved at eval steps)
    config.best_metric = "eval/loss"
    config.best_mode = "min"
    config.early_stopping_patience = 0  # stop after this many evals without a better best_metric; 0: never
    config.init_from = ""  # a converted checkpoint workdir (t5x_lite.convert from-hf)
    config.skip_nonfinite_updates = False  # True: drop an update whose loss/gradient is not finite, keep going
    config.debug_crash_after_step = 0  # fault injection (tests): SIGKILL right after saving that step
    config.profile_steps = ()  # e.g. (100, 110): a jax.profiler trace of those steps in WORKDIR/profile
    # evaluation decoding (periodic eval and t5x_lite.evaluate's defaults): beam_size 1 is greedy
    config.eval_beam_size = 1
    config.eval_alpha = 0.6  # GNMT length penalty ((5 + len) / 6) ** alpha for beam search
    config.eval_max_decode_length = 0  # 0: the task's target length
    return config
