"""LoRA fine-tuning through Qwix: low-rank adapters on every attention and MLP matmul, the base weights frozen.

Qwix's ``LoraProvider`` intercepts each ``dot_general`` on a weight ``W`` (shape ``[in..., out...]``) and adds
``x @ A @ B * alpha / rank``, with ``A`` (``[prod(in), rank]``, He-uniform) and ``B`` (``[rank, prod(out)]``,
zeros) created next to ``W`` as ``kernel_lora_a`` / ``kernel_lora_b``. B starts at zero, so a fresh adapter leaves
the base model's outputs unchanged. Token embeddings and the (tied) output projection keep no adapter, unless
asked: ``lora_output`` (Qwix's adapter on the output projection), ``lora_embed`` (a low-rank adapter on the table
itself) and ``lora_rows`` (a full trainable change of chosen table rows; ``data.pipeline.most_frequent_tokens``
picks them).

Training (``TransformerConfig.lora_rank > 0``) updates the adapters only: the train step differentiates with
respect to the adapters alone (``split``; no weight-gradient matmuls for the base) and ``adapters_only`` gives the
optimizer no state for the base. ``merge`` folds trained adapters into the weights: a plain model of the base shape
(``python -m t5x_lite.lora_merge``).

QLoRA (``lora_rank`` with ``quantization``, Dettmers et al. 2023): the frozen base weights are held and applied
Qwix-quantized (int8 with per-channel scales, as ``python -m t5x_lite.quantize`` stores them), the adapters in
float; a quarter of the base's float bytes in memory and on disk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix

from t5x_lite import layers, quantization
from t5x_lite.quantization import EMBEDDING_MODULES, METHODS

# the factors of a low-rank adapter, and a token table's trainable rows (``TransformerConfig.lora_rows``)
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b", "_lora_rows")


def check(rank: int, alpha: float | None) -> None:
    """ValueError unless ``rank`` is a non-negative int and ``alpha`` (None: ``rank``) positive."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"lora_rank={rank!r} must be a non-negative integer (0: no adapters)")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"lora_alpha={alpha!r} must be positive (the adapters' output is scaled by alpha / rank)")


def scale(rank: int, alpha: float | None) -> float:
    """The factor of every adapter's ``A @ B``: ``alpha / rank`` (alpha None: 1)."""
    return float(alpha or rank) / rank


def wrap(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    scheme: str = "",
    quantize_embeddings: bool = True,
    *,
    output: bool = False,
) -> nn.Module:
    """``model`` with rank-``rank`` adapters on its attention and MLP weights (scale ``alpha / rank``), and with
    ``output`` on its output projection too; with a quantization ``scheme`` (QLoRA) the base weights are applied
    quantized, as ``quantization.wrap`` applies them."""
    check(rank, alpha)
    weight_qtype, act_qtype = quantization.SCHEMES[scheme] if scheme else (None, None)
    embedding_qtype = weight_qtype if quantize_embeddings else None
    adapter = functools.partial(qwix.LoraRule, rank=rank, alpha=float(alpha or rank), act_qtype=act_qtype)
    # The token table (shared, or per stack) and an untied output projection: the first matching rule wins. Their
    # only matmul is the output projection (a lookup is a gather, which Qwix leaves alone), so an adapter there
    # changes the logits and not the embeddings of the input tokens.
    embeddings = (
        adapter(module_path=EMBEDDING_MODULES, weight_qtype=embedding_qtype)
        if output
        else qwix.QuantizationRule(module_path=EMBEDDING_MODULES, weight_qtype=embedding_qtype, act_qtype=act_qtype)
    )
    # A token table's own adapter (lora_embed) computes in a parameter-free child module: no rule touches it.
    untouched = qwix.QuantizationRule(module_path=r"(.*/)?lora_table")
    provider = qwix.LoraProvider([untouched, embeddings, adapter(module_path=".*", weight_qtype=weight_qtype)])
    return qwix.apply_lora_to_model(model, provider, methods=METHODS)


def _name(path: tuple[Any, ...]) -> str:
    return str(getattr(path[-1], "key", path[-1])) if path else ""


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether the parameter at ``path`` (a tree path) is a LoRA factor."""
    return _name(path).endswith(ADAPTER_SUFFIXES)


# adapter groups that can train at a learning rate of their own (``adapters_only``): group -> parameter-name suffix
SEPARATE_GROUPS = {"rows": "_lora_rows", "b": "_lora_b"}


def labels(params: Any, apart: tuple[str, ...] = ()) -> Any:
    """``"adapter"`` or ``"frozen"`` for every leaf of ``params`` (``optax.multi_transform``'s labels); a leaf of
    a group named in ``apart`` (``SEPARATE_GROUPS``: a token table's trainable rows, the B factors) is that group."""

    def label(path: tuple[Any, ...], _: Any) -> str:
        name = _name(path)
        for group in apart:
            if name.endswith(SEPARATE_GROUPS[group]):
                return group
        return "adapter" if is_adapter(path) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def split(params: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The adapters of ``params`` (a list) and the function that puts a list like it back among the base weights:
    the train step differentiates through it with respect to the adapters only (a quantized base has integer
    leaves, which have no gradient)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [is_adapter(path) for path, _ in flat]

    def rebuild(adapters: list[Any]) -> Any:
        given = iter(adapters)
        return treedef.unflatten([next(given) if pick else leaf for pick, (_, leaf) in zip(chosen, flat, strict=True)])

    return [leaf for pick, (_, leaf) in zip(chosen, flat, strict=True) if pick], rebuild


def full_gradient(adapter_grads: list[Any], params: Any) -> Any:
    """The gradient of every leaf of ``params`` from the adapters' (``split`` order): zero for the base."""
    _, rebuild = split(jax.tree.map(jnp.zeros_like, params))
    return rebuild(adapter_grads)


def adapters_only(
    optimizer: optax.GradientTransformation, rows_scale: float = 1.0, b_scale: float = 1.0
) -> optax.GradientTransformation:
    """``optimizer`` on the adapters; the base weights never move and hold no optimizer state. ``rows_scale``
    multiplies the updates of trainable token-table rows (``lora_rows``): their learning rate relative to the
    adapters', whose zero-started low-rank factors usually want a larger one than a full weight does. ``b_scale``
    multiplies the B factors' updates (LoRA+, Hayou et al. 2024: B learning faster than A speeds LoRA up)."""
    scaled = {group: factor for group, factor in (("rows", rows_scale), ("b", b_scale)) if factor != 1.0}
    transforms = {"adapter": optimizer, "frozen": optax.set_to_zero()}
    transforms |= {group: optax.chain(optimizer, optax.scale(factor)) for group, factor in scaled.items()}
    return optax.multi_transform(transforms, functools.partial(labels, apart=tuple(scaled)))


def holds_adapters(params: Any) -> bool:
    """Whether a parameter tree holds LoRA factors (a LoRA run's checkpoint, not a base model's)."""
    return any(is_adapter(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def adapters_of(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA factors of ``tree`` (nested dicts) at their places, nothing else: what a LoRA run's checkpoints
    hold (the base is read back from its ``init_from``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key.endswith(ADAPTER_SUFFIXES):
            out[key] = value
        elif isinstance(value, Mapping) and (inner := adapters_of(value)):
            out[key] = inner
    return out


def holds_adapters_only(params: Any) -> bool:
    """Whether ``params`` holds LoRA factors and nothing else (a LoRA checkpoint without its base)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return bool(flat) and all(is_adapter(path) for path, _ in flat)


def without_adapters(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` (nested dicts) without its LoRA factors: the base model's parameters."""
    return {
        key: without_adapters(value) if isinstance(value, Mapping) else value
        for key, value in tree.items()
        if not key.endswith(ADAPTER_SUFFIXES)
    }


def with_adapters(tree: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` (nested dicts) with every LoRA factor of ``source`` added at its place: e.g. a quantized base's
    tree, which Qwix builds without the adapters, completed by the float LoRA model's."""
    out = dict(tree)
    for key, value in source.items():
        if key.endswith(ADAPTER_SUFFIXES):
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = with_adapters(out[key], value)
    return out


def count_adapter_params(params: Any) -> int:
    """Number of trainable (adapter) parameters in ``params``."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return int(sum(np.size(leaf) for path, leaf in flat if is_adapter(path)))


def insert_base(params: Any, base: Mapping[str, Any]) -> Any:
    """``params`` (a LoRA model's tree) with every base weight taken from ``base`` (the model without adapters,
    e.g. an ``init_from`` checkpoint); the adapters keep their initial values. ValueError on a missing weight."""

    def take(path: tuple[Any, ...], leaf: Any) -> Any:
        if is_adapter(path):
            return leaf
        value = quantization.lookup(base, path, "the base checkpoint")
        return jnp.asarray(value, leaf.dtype) if hasattr(leaf, "dtype") else value

    return jax.tree_util.tree_map_with_path(take, params)


def untie_output_adapter(params: Mapping[str, Any], rank: int, alpha: float | None = None) -> tuple[dict, bool]:
    """A tied token table with an output adapter (``lora_output``) cannot absorb it: the table also embeds the input
    tokens. Returns ``params`` with the adapter folded into an untied ``decoder/logits_dense`` kernel
    (``table.T + A @ B * alpha / rank``) and the table left as it is, and whether it did so (the merged model then
    has ``tie_word_embeddings=False``)."""
    out = dict(params)
    decoder = dict(out.get("decoder", {}))
    holder = "token_embedder" if "embedding_lora_a" in out.get("token_embedder", {}) else None
    if holder is None and "embedding_lora_a" in decoder.get("token_embedder", {}):
        holder = "decoder"
    if holder is None:
        return out, False
    table = dict(out["token_embedder"] if holder == "token_embedder" else decoder["token_embedder"])
    a, b = table.pop("embedding_lora_a"), table.pop("embedding_lora_b")
    embedding = jnp.asarray(table["embedding"])
    delta = (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)) * scale(rank, alpha)
    decoder["logits_dense"] = {"kernel": (embedding.T.astype(jnp.float32) + delta).astype(embedding.dtype)}
    if holder == "token_embedder":
        out["token_embedder"] = table
    else:
        decoder["token_embedder"] = table
    out["decoder"] = decoder
    return out, True


def merge(
    params: Mapping[str, Any], rank: int, alpha: float | None = None, rows: tuple[int, ...] = ()
) -> dict[str, Any]:
    """The plain parameters that ``params`` (a LoRA model's) compute: every ``W`` becomes
    ``W + reshape(A @ B) * alpha / rank``, a token table's trainable rows (``lora_rows`` = ``rows``) are added to
    its rows ``rows``, and the adapters are dropped. ValueError on factors that do not fit. (A tied table's output
    adapter needs ``untie_output_adapter`` first.)"""
    check(rank, alpha)
    factor = scale(rank, alpha)

    def fold(node: Mapping[str, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.endswith(ADAPTER_SUFFIXES):
                continue
            if isinstance(value, Mapping):
                out[key] = fold(value, f"{where}{key}/")
                continue
            a, b, changed = node.get(key + "_lora_a"), node.get(key + "_lora_b"), node.get(key + "_lora_rows")
            weight = jnp.asarray(value)
            if changed is not None:
                if np.shape(changed) != (len(rows), weight.shape[-1]) or weight.ndim != 2:
                    raise ValueError(
                        f"{where}{key}: trainable rows {list(np.shape(changed))} do not fit the table "
                        f"{list(weight.shape)} and lora_rows ({len(rows)} ids)"
                    )
                changes = layers.row_changes(jnp.asarray(changed, jnp.float32), rows, weight.shape[0])
                weight = (weight.astype(jnp.float32) + changes).astype(weight.dtype)
            if a is None and b is None:
                out[key] = weight if changed is not None else value
                continue
            if a is None or b is None or np.ndim(a) != 2 or np.ndim(b) != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"{where}{key}: incomplete adapter (needs lora_a [in, rank] and lora_b [rank, out])")
            lead = _split(weight.shape, a.shape[0])
            if lead < 0 or int(np.prod(weight.shape[lead:])) != b.shape[1]:
                raise ValueError(
                    f"{where}{key}: adapter factors {list(a.shape)} x {list(b.shape)} do not fit the weight "
                    f"{list(weight.shape)}"
                )
            delta = (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)) * factor
            out[key] = (weight.astype(jnp.float32) + delta.reshape(weight.shape)).astype(weight.dtype)
        return out

    return fold(params, "")


def _split(shape: tuple[int, ...], rows: int) -> int:
    """How many leading dims of ``shape`` multiply to ``rows`` (the weight's contracted, input dims)."""
    product = 1
    for index, size in enumerate(shape):
        if product == rows:
            return index
        product *= size
    return len(shape) if product == rows else -1
