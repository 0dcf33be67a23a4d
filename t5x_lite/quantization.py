"""Post-training quantization of a trained Transformer with Qwix: schemes, parameter conversion, storage.

Qwix intercepts the model's ``jax.lax.dot_general`` / ``jnp.einsum`` calls on parameters and runs them on int8 (or
fp8) weights with per-channel scales (one scale per output unit: the non-contracted axes of each weight). The
quantized parameters are a tree of ``qwix`` ``WithAux[QArray]`` leaves; on disk each becomes a plain
``{"qvalue", "scale"}`` dict, so that a quantized checkpoint is an ordinary Orbax tree of arrays and the model
config (``TransformerConfig.quantization``) says how to rebuild it. ``python -m t5x_lite.quantize`` is the command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.providers.ptq import WithAux  # the PTQ leaf type; not re-exported by qwix

from t5x_lite import adafactor

# scheme -> (weight type, activation type or None). Activations are quantized dynamically (per token, from
# their own absolute maximum), the default of Qwix's XLA path.
SCHEMES: dict[str, tuple[Any, Any]] = {
    "int8": (jnp.int8, None),  # weight-only: int8 storage, float compute after dequantization
    "int8_dynamic": (jnp.int8, jnp.int8),  # int8 x int8 matmuls
    "fp8": (jnp.float8_e4m3fn, jnp.float8_e4m3fn),  # where the backend runs float8 dots (recent GPUs, TPUs)
}
# Module paths of the token table (shared, or per stack) and of an untied output projection.
EMBEDDING_MODULES = r"(.*/)?(token_embedder|logits_dense)"
QUANTIZED_KEYS = ("qvalue", "scale", "zero_point")
METHODS = ("__call__", "encode", "decode")


def check_scheme(scheme: str) -> None:
    """Raise a ValueError naming the choices when ``scheme`` is not one of ``SCHEMES`` (or "" for none)."""
    if scheme and scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")


def rules(scheme: str, quantize_embeddings: bool = True) -> list[qwix.QuantizationRule]:
    """Qwix rules for ``scheme``: every matmul on a weight, or all but the embedding / output projection."""
    check_scheme(scheme)
    weight_qtype, act_qtype = SCHEMES[scheme]
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=weight_qtype, act_qtype=act_qtype)
    if quantize_embeddings:
        return [rule]
    # Qwix takes the first matching rule; a rule without weight_qtype leaves the op in float.
    return [qwix.QuantizationRule(module_path=EMBEDDING_MODULES), rule]


def wrap(model: nn.Module, scheme: str, quantize_embeddings: bool = True) -> nn.Module:
    """``model`` with its ``__call__``, ``encode`` and ``decode`` running on Qwix-quantized weights."""
    provider = qwix.PtqProvider(rules(scheme, quantize_embeddings))
    return qwix.quantize_model(model, provider, methods=METHODS)


def wrap_qat(model: nn.Module, scheme: str, quantize_embeddings: bool = True) -> nn.Module:
    """``model`` for quantization-aware training: float parameters, every matmul on a weight run on its
    ``scheme``-quantized copy (per-channel scales as PTQ computes them; activations too for ``int8_dynamic``) with
    straight-through gradients, so that training adapts to the rounding that ``python -m t5x_lite.quantize``
    applies afterwards."""
    check_scheme(scheme)
    weight_qtype, act_qtype = SCHEMES[scheme]
    rule = qwix.QtRule(module_path=".*", weight_qtype=weight_qtype, act_qtype=act_qtype)
    rules = [rule] if quantize_embeddings else [qwix.QuantizationRule(module_path=EMBEDDING_MODULES), rule]
    return qwix.quantize_model(model, qwix.QtProvider(rules), methods=METHODS)


def fake_quantize_rows(table: jax.Array, scheme: str) -> jax.Array:
    """``table`` quantized per row (as PTQ stores a tied embedding) and back, with a straight-through gradient."""
    weight_qtype, _ = SCHEMES[scheme]
    rounded = qwix.dequantize(qwix.quantize(table, weight_qtype, channelwise_axes=[0])).astype(table.dtype)
    return table + jax.lax.stop_gradient(rounded - table)


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a Qwix PTQ weight (``WithAux`` holding a ``QArray``)."""
    return isinstance(leaf, WithAux)


def is_quantized_tree(params: Any) -> bool:
    """Whether ``params`` holds Qwix PTQ weights (as ``checkpoints.load_params`` rebuilds a quantized workdir)."""
    return any(is_quantized(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_quantized))


def holds_quantized(stored: Any) -> bool:
    """Whether a restored parameter tree holds quantized weights (``{"qvalue", "scale"}`` dicts)."""
    if isinstance(stored, Mapping):
        return "qvalue" in stored or any(holds_quantized(value) for value in stored.values())
    return False


def take_rows(table: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """``table[ids]`` for a quantized embedding table: gathers the int8 rows and their scales, then dequantizes.

    The table's scales are per row (the tied output projection contracts the feature axis), so a lookup costs the
    gathered rows only, never a dequantized copy of the whole table.
    """
    quantized = table.array
    rows = dataclasses.replace(
        quantized,
        qvalue=jnp.take(quantized.qvalue, ids, axis=0),
        scale=_take_broadcast(quantized.scale, ids),
        zero_point=None if quantized.zero_point is None else _take_broadcast(quantized.zero_point, ids),
    )
    return qwix.dequantize(rows).astype(dtype)


def _take_broadcast(values: jax.Array, ids: jax.Array) -> jax.Array:
    # A per-tensor scale (leading axis 1) is shared by every row.
    if values.shape[0] == 1:
        return values.reshape((1,) * ids.ndim + values.shape[1:])
    return jnp.take(values, ids, axis=0)


def abstract_params(model: nn.Module, cfg_shapes: tuple[jax.Array, jax.Array]) -> Any:
    """Shapes (and Qwix's how-to-quantize metadata) of the quantized model's parameters, without computing any."""
    encoder_tokens, decoder_tokens = cfg_shapes
    return unbox_shapes(jax.eval_shape(model.init, jax.random.key(0), encoder_tokens, decoder_tokens)["params"])


def unbox_shapes(tree: Any) -> Any:
    """``tree`` without its logical-axis boxes. Unlike ``nn.meta.unbox`` it adds no sharding constraint, so it
    also works on shapes inside a jit-traced function under an active mesh."""
    return jax.tree.map(
        lambda box: box.unbox(apply_constraint=False), tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )


def quantize_params(params: Any, abstract: Any) -> Any:
    """Float parameters -> the quantized tree that the wrapped model applies (``WithAux`` leaves where quantized)."""
    return qwix.quantize_params(nn.meta.unbox(params), abstract)


def to_storage(quantized: Any) -> Any:
    """The quantized tree as plain nested dicts of arrays: each quantized weight a ``{"qvalue", "scale"}`` dict."""

    def store(leaf: Any) -> Any:
        if not is_quantized(leaf):
            return leaf
        array = leaf.array
        stored = {"qvalue": array.qvalue, "scale": array.scale}
        if array.zero_point is not None:
            stored["zero_point"] = array.zero_point
        return stored

    return jax.tree.map(store, quantized, is_leaf=is_quantized)


def lookup(tree: Mapping[str, Any], path: tuple[Any, ...], source: str) -> Any:
    """The value of nested dicts ``tree`` at a tree path of another tree (the same model's parameters); ValueError
    naming the parameter that ``source`` (e.g. "the base checkpoint") lacks."""
    value = tree
    for key in path:
        key = getattr(key, "key", key)
        if not isinstance(value, Mapping) or key not in value:
            name = "/".join(adafactor.path_names(path))
            raise ValueError(f"{source} has no parameter {name!r}: written for another model?")
        value = value[key]
    return value


def from_storage(stored: Mapping[str, Any], abstract: Any) -> Any:
    """Inverse of ``to_storage``: rebuild the ``WithAux[QArray]`` leaves that ``abstract`` says are quantized.

    Raises a ValueError naming the parameter when the stored tree does not match the model (another config or
    another scheme).
    """

    def rebuild(path: tuple[Any, ...], template: Any) -> Any:
        name = "/".join(adafactor.path_names(path))
        value = lookup(stored, path, "the quantized checkpoint")
        if is_quantized(template):
            if not isinstance(value, Mapping) or not {"qvalue", "scale"} <= set(value):
                raise ValueError(f"parameter {name!r} is quantized in the model; the checkpoint holds an array")
            fields = {key: jnp.asarray(value[key]) for key in QUANTIZED_KEYS if key in value}
            expected = template.array.qvalue
            if fields["qvalue"].shape != expected.shape or fields["qvalue"].dtype != expected.dtype:
                raise ValueError(
                    f"parameter {name!r}: stored {fields['qvalue'].dtype}{list(fields['qvalue'].shape)}, the model "
                    f"expects {expected.dtype}{list(expected.shape)} (another scheme or model?)"
                )
            return template.replace(array=dataclasses.replace(template.array, **fields))
        if isinstance(value, Mapping):
            raise ValueError(f"parameter {name!r} is quantized in the checkpoint but not in the model config")
        return jnp.asarray(value)

    return jax.tree_util.tree_map_with_path(rebuild, abstract, is_leaf=is_quantized)


def dequantize_params(quantized: Any) -> Any:
    """The float parameters that the quantized tree stands for (for tests and for fine-tuning after PTQ)."""
    return jax.tree.map(
        lambda leaf: qwix.dequantize(leaf.array) if is_quantized(leaf) else leaf, quantized, is_leaf=is_quantized
    )


def storage_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (quantized values and their scales included)."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))
