"""Hugging Face T5 <-> t5x_lite parameters.

Library::

    cfg, params = params_from_hf(state_dict, hf_config)   # torch tensors or NumPy arrays, config.json as a dict
    state_dict = params_to_hf(params, cfg)                # dict[str, np.ndarray] in HF's names

Command line::

    python -m t5x_lite.convert from-hf --hf_dir DIR --workdir OUT   # config.json + model.safetensors -> Orbax
                                                                    # (+ spiece.model -> OUT/vocab, 100 sentinels)
    python -m t5x_lite.convert to-hf --workdir OUT --out DIR        # Orbax -> config.json + model.safetensors

Tying. Hugging Face's ``T5Config`` (transformers 5.x) always ties ``lm_head`` to ``shared`` in memory and
records T5 v1.0's ``d_model**-0.5`` output rescale as ``scale_decoder_outputs``; a T5 v1.1 ``config.json``
says ``tie_word_embeddings: false`` and ships its own ``lm_head.weight``. So the arrays decide whether the
output projection is tied (``lm_head.weight`` absent or equal to ``shared.weight``) and the flags decide the
rescale (``scale_decoder_outputs`` when present, else ``tie_word_embeddings`` not false).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle  # the exception type only: nothing is unpickled here
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from t5x_lite import cli
from t5x_lite.data.vocab import Vocabulary
from t5x_lite.network import TransformerConfig, check_params_match, scan_params, unscan_params

_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}
_OUR_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu"}

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
SPIECE_FILE = "spiece.model"  # the SentencePiece model in a Hugging Face T5 directory


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig of a Hugging Face T5 ``config.json`` (tying is settled by ``params_from_hf``)."""
    proj = hf_config.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    hf_act = proj.removeprefix("gated-")
    hf_act = "gelu_new" if proj == "gated-gelu" else hf_config.get("dense_act_fn", hf_act)
    if hf_act not in _HF_ACTIVATIONS:
        raise ValueError(
            f"hf_config feed_forward_proj={proj!r}: activation {hf_act!r} is not supported; "
            f"use one of {sorted(_HF_ACTIVATIONS)}"
        )
    if "scale_decoder_outputs" in hf_config:
        rescale = bool(hf_config["scale_decoder_outputs"])
    else:
        rescale = hf_config.get("tie_word_embeddings", True) is not False
    num_layers = hf_config["num_layers"]
    values = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["d_model"],
        num_heads=hf_config["num_heads"],
        d_kv=hf_config["d_kv"],
        d_ff=hf_config["d_ff"],
        num_encoder_layers=num_layers,
        num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
        dropout_rate=hf_config.get("dropout_rate", 0.1),
        mlp_activation=("gated-" if gated else "") + _HF_ACTIVATIONS[hf_act],
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        rescale_logits=rescale,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def _check_t5_style(cfg: TransformerConfig) -> None:
    """Only the T5 architecture has a Hugging Face T5 counterpart."""
    required = dict(
        norm_type="rmsnorm",
        norm_position="pre",
        position_embedding="relative",
        scale_qk=False,
        scale_embeddings=False,
        use_bias=False,
        share_embeddings=True,
    )
    for field, value in required.items():
        if getattr(cfg, field) != value:
            raise ValueError(
                f"TransformerConfig.{field}={getattr(cfg, field)!r}: Hugging Face T5 needs {value!r}; "
                "only T5-style models convert to and from transformers' T5ForConditionalGeneration"
            )


def _attention_from_hf(get, prefix: str, cfg: TransformerConfig) -> dict[str, Any]:
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    out = {
        name: {"kernel": get(f"{prefix}.{hf}.weight", (h * k, d)).T.reshape(d, h, k)}
        for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))
    }
    out["out"] = {"kernel": get(f"{prefix}.o.weight", (d, h * k)).T.reshape(h, k, d)}
    return out


def _mlp_from_hf(get, prefix: str, cfg: TransformerConfig) -> dict[str, Any]:
    names = ("wi_0", "wi_1") if cfg.mlp_activation.startswith("gated-") else ("wi",)
    out = {name: {"kernel": get(f"{prefix}.{name}.weight", (cfg.d_ff, cfg.d_model)).T} for name in names}
    out["wo"] = {"kernel": get(f"{prefix}.wo.weight", (cfg.d_model, cfg.d_ff)).T}
    return out


def params_from_hf(
    state_dict: Mapping[str, Any], hf_config: Mapping[str, Any], scan_layers: bool = False, **overrides: Any
):
    """(TransformerConfig, params) of a Hugging Face T5 state dict and its config.json dict."""
    arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
    if "shared.weight" not in arrays:
        raise ValueError("state dict has no 'shared.weight': not a T5ForConditionalGeneration checkpoint")
    lm_head = arrays.get("lm_head.weight")
    tied = lm_head is None or np.array_equal(lm_head, arrays["shared.weight"])
    cfg = config_from_hf(hf_config, tie_word_embeddings=tied, scan_layers=scan_layers, **overrides)
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"state dict lacks {name!r} needed by hf_config (num_layers/feed_forward_proj)")
        value = arrays[name]
        if value.shape != shape:
            field = _mismatched_field(cfg, shape, value.shape)
            raise ValueError(
                f"hf_config {field}={getattr(cfg, field)} does not match the checkpoint: "
                f"{name} has shape {value.shape}, "
                f"the config gives {shape}"
            )
        used.add(name)
        return value

    vocab, d = cfg.vocab_size, cfg.d_model
    params: dict[str, Any] = {"token_embedder": {"embedding": get("shared.weight", (vocab, d))}}
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        tree: dict[str, Any] = {}
        for i in range(n):
            block = f"{stack}.block.{i}.layer"
            layer = {
                "pre_" + ("self_" if stack == "decoder" else "") + "attention_layer_norm": {
                    "scale": get(f"{block}.0.layer_norm.weight", (d,))
                }
            }
            layer["self_attention" if stack == "decoder" else "attention"] = _attention_from_hf(
                get, f"{block}.0.SelfAttention", cfg
            )
            mlp_index = 1
            if stack == "decoder":
                layer["pre_cross_attention_layer_norm"] = {"scale": get(f"{block}.1.layer_norm.weight", (d,))}
                layer["encoder_decoder_attention"] = _attention_from_hf(get, f"{block}.1.EncDecAttention", cfg)
                mlp_index = 2
            layer["pre_mlp_layer_norm"] = {"scale": get(f"{block}.{mlp_index}.layer_norm.weight", (d,))}
            layer["mlp"] = _mlp_from_hf(get, f"{block}.{mlp_index}.DenseReluDense", cfg)
            tree[f"layers_{i}"] = layer
        rel = get(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relative_attention_num_buckets, cfg.num_heads),
        )
        tree["relpos_bias"] = {"rel_embedding": rel.T}
        tree[f"{stack}_norm"] = {"scale": get(f"{stack}.final_layer_norm.weight", (d,))}
        params[stack] = tree
    if not tied:
        params["decoder"]["logits_dense"] = {"kernel": get("lm_head.weight", (vocab, d)).T}
    tied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    ignorable = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    unused = sorted(set(arrays) - used - tied_copies - ignorable)
    if unused:
        raise ValueError(
            f"state dict has {len(unused)} entries hf_config does not account for, "
            f"e.g. {unused[0]!r} (check num_layers)"
        )
    if scan_layers:
        params = scan_params(params, cfg)
    params = _numpy_tree(params)
    return cfg, params


def _mismatched_field(cfg: TransformerConfig, expected: tuple[int, ...], actual: tuple[int, ...]) -> str:
    inner = cfg.num_heads * cfg.head_dim
    for e, a in zip(expected, actual, strict=False):
        if e != a:
            for field, value in (
                ("d_model", cfg.d_model),
                ("d_ff", cfg.d_ff),
                ("vocab_size", cfg.vocab_size),
                ("relative_attention_num_buckets", cfg.relative_attention_num_buckets),
            ):
                if e == value:
                    return field
            if e == inner:
                return "d_kv"
            if e == cfg.num_heads:
                return "num_heads"
    return "d_model"


def _numpy_tree(tree: Any) -> Any:
    """Nested dict of contiguous NumPy arrays (HF arrays may be views of torch storage; scan_params gives jax)."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()})


def params_to_hf(params: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Hugging Face T5ForConditionalGeneration state dict (NumPy) of t5x_lite ``params``.

    Includes the tied copies (``encoder/decoder.embed_tokens.weight``, ``lm_head.weight``), so every key of
    ``T5ForConditionalGeneration.state_dict()`` is present. transformers 5.x ties ``lm_head`` to ``shared`` in
    memory: for an untied model (T5 v1.1) give the HF model its own ``lm_head`` before ``load_state_dict``, or
    use ``save_hf_dir`` + ``from_pretrained``, which unties when the two arrays differ.
    """
    _check_t5_style(cfg)
    check_params_match(cfg, params, source="the params")
    tree = _numpy_tree(unscan_params(params, cfg) if cfg.scan_layers else params)
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    out: dict[str, np.ndarray] = {}

    def put_attention(prefix: str, attn: Mapping[str, Any]) -> None:
        for name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{prefix}.{hf}.weight"] = attn[name]["kernel"].reshape(d, h * k).T
        out[f"{prefix}.o.weight"] = attn["out"]["kernel"].reshape(h * k, d).T

    shared = tree["token_embedder"]["embedding"]
    out["shared.weight"] = shared
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        out[f"{stack}.embed_tokens.weight"] = shared
        for i in range(n):
            layer = tree[stack][f"layers_{i}"]
            block = f"{stack}.block.{i}.layer"
            if stack == "decoder":
                out[f"{block}.0.layer_norm.weight"] = layer["pre_self_attention_layer_norm"]["scale"]
                put_attention(f"{block}.0.SelfAttention", layer["self_attention"])
                out[f"{block}.1.layer_norm.weight"] = layer["pre_cross_attention_layer_norm"]["scale"]
                put_attention(f"{block}.1.EncDecAttention", layer["encoder_decoder_attention"])
                mlp_index = 2
            else:
                out[f"{block}.0.layer_norm.weight"] = layer["pre_attention_layer_norm"]["scale"]
                put_attention(f"{block}.0.SelfAttention", layer["attention"])
                mlp_index = 1
            out[f"{block}.{mlp_index}.layer_norm.weight"] = layer["pre_mlp_layer_norm"]["scale"]
            for name, kernel in layer["mlp"].items():
                out[f"{block}.{mlp_index}.DenseReluDense.{name}.weight"] = kernel["kernel"].T
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = tree[stack]["relpos_bias"][
            "rel_embedding"
        ].T
        out[f"{stack}.final_layer_norm.weight"] = tree[stack][f"{stack}_norm"]["scale"]
    out["lm_head.weight"] = shared if cfg.tie_word_embeddings else tree["decoder"]["logits_dense"]["kernel"].T
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def hf_config_from(cfg: TransformerConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers' T5Config reads back into the same architecture."""
    _check_t5_style(cfg)
    gated = cfg.mlp_activation.startswith("gated-")
    activation = _OUR_ACTIVATIONS[cfg.mlp_activation.removeprefix("gated-")]
    if gated:
        proj = "gated-gelu" if activation == "gelu_new" else f"gated-{activation}"
    elif activation == "gelu_new":
        raise ValueError(
            "TransformerConfig.mlp_activation='gelu' (tanh, ungated) has no Hugging Face T5 feed_forward_proj"
        )
    else:
        proj = activation
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": proj,
        # Older transformers read the output rescale from tie_word_embeddings; 5.x from scale_decoder_outputs.
        "tie_word_embeddings": cfg.rescale_logits,
        "scale_decoder_outputs": cfg.rescale_logits,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


# --------------------------------------------------------------------------------------------------------------
# Files: Hugging Face directories and t5x_lite workdirs.
# --------------------------------------------------------------------------------------------------------------


def load_hf_dir(hf_dir: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """State dict and config of a Hugging Face model directory (model.safetensors or pytorch_model.bin)."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --hf_dir must be a Hugging Face T5 model directory")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    safetensors_path = os.path.join(hf_dir, "model.safetensors")
    torch_path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.numpy import load_file

        state_dict = load_file(safetensors_path)
    elif os.path.isfile(torch_path):
        import torch  # the `dev` extra; only needed for legacy .bin checkpoints

        try:  # torch's weights-only unpickler: tensors and plain containers, never code (nothing executes on load)
            state_dict = torch.load(torch_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{torch_path} holds more than tensors, which the weights-only loader refuses to run "
                f"({str(error).splitlines()[0][:200]}); convert it to model.safetensors with a tool you trust"
            ) from None
    else:
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")
    return state_dict, hf_config


def save_hf_dir(params: Mapping[str, Any], cfg: TransformerConfig, out_dir: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``T5ForConditionalGeneration.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    state_dict = params_to_hf(params, cfg)
    hf_config = hf_config_from(cfg)
    # Tied copies are stored once, as transformers does; a distinct lm_head (T5 v1.1) is stored.
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state_dict.pop(name)
    if cfg.tie_word_embeddings:
        state_dict.pop("lm_head.weight")
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: np.asarray(v, np.float32) if v.dtype != np.float32 else v for k, v in state_dict.items()},
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


def save_converted(workdir: str, params: Any, cfg: TransformerConfig) -> str:
    """Write ``params`` as an Orbax checkpoint plus ``model_config.json`` under ``workdir``; returns the path."""
    import orbax.checkpoint as ocp

    workdir = os.path.abspath(workdir)
    params_path = os.path.join(workdir, PARAMS_DIR)
    if os.path.exists(params_path):
        raise FileExistsError(f"{params_path} already exists; choose another --workdir or remove it first")
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_path, params)
    checkpointer.wait_until_finished()
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(cfg.to_json())
    return params_path


def load_converted(workdir: str, cfg: TransformerConfig | None = None) -> tuple[TransformerConfig, Any]:
    """(config, params) of a workdir written by ``save_converted``; ``cfg`` (if given) is checked against it."""
    import orbax.checkpoint as ocp

    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    params_path = os.path.join(workdir, PARAMS_DIR)
    if not os.path.isfile(config_path) or not os.path.isdir(params_path):
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE} and {PARAMS_DIR}/: not written by `t5x_lite.convert from-hf`"
        )
    with open(config_path, encoding="utf-8") as f:
        saved_cfg = TransformerConfig.from_dict(json.load(f))
    params = ocp.StandardCheckpointer().restore(params_path)
    check_params_match(cfg or saved_cfg, params, source=f"the checkpoint in {workdir}")
    return cfg or saved_cfg, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from_hf = sub.add_parser("from-hf", help="Hugging Face T5 directory -> t5x_lite Orbax checkpoint")
    from_hf.add_argument("--hf_dir", required=True)
    from_hf.add_argument("--workdir", required=True)
    from_hf.add_argument("--scan_layers", action="store_true", help="write the scanned (stacked layers) layout")
    from_hf.add_argument(
        "--extra_ids", type=int, default=100, help=f"sentinels after the pieces of {SPIECE_FILE} (T5: 100)"
    )
    to_hf = sub.add_parser("to-hf", help="t5x_lite converted checkpoint -> Hugging Face T5 directory")
    to_hf.add_argument("--workdir", required=True)
    to_hf.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "from-hf":
            state_dict, hf_config = load_hf_dir(args.hf_dir)
            cfg, params = params_from_hf(state_dict, hf_config, scan_layers=args.scan_layers)
            spiece = os.path.join(args.hf_dir, SPIECE_FILE)
            vocab = Vocabulary(spiece, extra_ids=args.extra_ids) if os.path.isfile(spiece) else None
            if vocab is not None and vocab.vocab_size > cfg.vocab_size:
                raise ValueError(
                    f"{spiece} with {args.extra_ids} extra_ids has {vocab.vocab_size} ids, more than the model's "
                    f"{cfg.vocab_size} embedding rows: pass the --extra_ids the checkpoint was trained with"
                )
            path = save_converted(args.workdir, params, cfg)
            print(f"wrote {path} and {os.path.join(os.path.abspath(args.workdir), CONFIG_FILE)}")
            if vocab is not None:  # fine-tuning from this workdir (init_from) then tokenizes as the checkpoint did
                print(f"wrote {vocab.save(os.path.join(os.path.abspath(args.workdir), 'vocab'))}")
            else:
                print(f"note: {args.hf_dir} has no {SPIECE_FILE}; init_from this workdir uses the task's vocabulary")
        else:
            cfg, params = load_converted(args.workdir)
            save_hf_dir(params, cfg, args.out)
            print(f"wrote {os.path.join(args.out, 'config.json')} and {os.path.join(args.out, 'model.safetensors')}")
    except cli.EXPECTED_ERRORS as error:
        return cli.error_status(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
