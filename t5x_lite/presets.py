"""Model-size presets: ``get_model_config('t5_v1_1_base', dropout_rate=0.0)`` -> TransformerConfig.

T5 v1.0 (``t5_small`` ... ``t5_xxl``) and T5 v1.1 (``t5_v1_1_small`` ... ``t5_v1_1_xxl``) match the published
Hugging Face configs (google-t5/t5-*, google/t5-v1_1-*) layer for layer, so converted checkpoints load into them;
``transformer_*`` are the classic Transformer of Vaswani et al. (2017) and Wu et al. (2021)'s Multi30k baseline.
"""

from __future__ import annotations

from typing import Any

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
    # A CPU-sized T5 v1.1 (about 16M parameters with a 16k vocabulary): every v1.1 choice at a quarter of small's
    # width and half its depth, for pre-training and fine-tuning on the local corpora (configs/pretrain_local.py).
    "t5_v1_1_mini": dict(_T5_V1_1, d_model=256, num_heads=4, d_kv=64, d_ff=768, **_layers(4), init_through_scan=False),
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


def embedding_rows(vocab_ids: int) -> int:
    """The embedding rows of a model for a vocabulary of ``vocab_ids`` ids (pieces + sentinels): a multiple of 128,
    as T5 pads 32,100 ids to 32,128 rows."""
    return -(-vocab_ids // 128) * 128


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
