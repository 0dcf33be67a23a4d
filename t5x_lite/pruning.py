"""Structured pruning: removes the least important FFN units and attention heads of every layer.

The result is a smaller dense model (``d_ff`` and ``num_heads`` reduced, ``d_kv`` kept), so it really computes
less, unlike a masked one. Importance is data-free and per layer: an FFN unit scores the product of the norms of
its input column(s) and its output row; a head scores the product of the norms of its value and output slices,
the scale of what it can add to the residual stream (Michel et al. 2019 measure the same by gradients).
Every layer keeps the same number of units and heads, since ``TransformerConfig`` has one ``d_ff`` and one
``num_heads``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from t5x_lite import network
from t5x_lite.network import TransformerConfig

ATTENTION_KEYS = frozenset({"query", "key", "value", "out"})
MLP_INPUTS = ("wi", "wi_0", "wi_1")

Path = tuple[str, ...]


def pruned_count(total: int, fraction: float, what: str) -> int:
    """How many of ``total`` units to remove for ``fraction``: at least that fraction, and never all of them."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what} fraction={fraction} must be in [0, 1)")
    count = math.ceil(fraction * total - 1e-9)
    if count >= total:
        raise ValueError(f"pruning {fraction:.0%} of {total} {what} would remove all of them; prune a smaller fraction")
    return count


def _is_attention(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) >= ATTENTION_KEYS


def _is_mlp(node: Any) -> bool:
    return isinstance(node, Mapping) and "wo" in node and any(name in node for name in MLP_INPUTS)


def ffn_unit_importance(mlp: Mapping[str, Any]) -> np.ndarray:
    """[d_ff] scores of one MLP block: norms of each unit's input column(s) times its output row's norm."""
    score = np.linalg.norm(np.asarray(mlp["wo"]["kernel"], np.float32), axis=1)
    for name in MLP_INPUTS:
        if name in mlp:
            score = score * np.linalg.norm(np.asarray(mlp[name]["kernel"], np.float32), axis=0)
    return score


def head_importance(attention: Mapping[str, Any]) -> np.ndarray:
    """[heads] scores of one attention block: norm of each head's value slice times its output slice's norm."""
    value = np.asarray(attention["value"]["kernel"], np.float32)  # [embed, heads, kv]
    out = np.asarray(attention["out"]["kernel"], np.float32)  # [heads, kv, embed]
    return np.sqrt((value**2).sum(axis=(0, 2))) * np.sqrt((out**2).sum(axis=(1, 2)))


def _keep(scores: np.ndarray, remove: int) -> np.ndarray:
    """Indices of the ``len(scores) - remove`` best units, in their original order (ties: the earlier unit)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[: len(scores) - remove])


def select_kept(params: Any, cfg: TransformerConfig, *, ffn_fraction: float, heads_fraction: float) -> dict:
    """``{path: kept indices}`` for every MLP and attention block of an unscanned float parameter tree."""
    ffn_remove = pruned_count(cfg.d_ff, ffn_fraction, "FFN units")
    heads_remove = pruned_count(cfg.num_heads, heads_fraction, "attention heads")
    if heads_remove and cfg.position_embedding == "relative":
        raise ValueError(
            "head pruning needs absolute positions: a relative-position bias is one table shared by every layer's "
            "heads, so layers cannot drop different heads; prune FFN units only (heads_fraction=0)"
        )
    kept: dict[Path, np.ndarray] = {}

    def visit(node: Any, path: Path) -> None:
        if _is_attention(node):
            kept[path] = _keep(head_importance(node), heads_remove)
        elif _is_mlp(node):
            kept[path] = _keep(ffn_unit_importance(node), ffn_remove)
        elif isinstance(node, Mapping):
            for name, child in node.items():
                visit(child, (*path, name))

    visit(params, ())
    return kept


def _map_blocks(params: Any, kept: dict, fn) -> Any:
    """A copy of ``params`` with every block named in ``kept`` replaced by ``fn(block, indices)``."""

    def visit(node: Any, path: Path) -> Any:
        if path in kept:
            return fn(node, kept[path])
        if isinstance(node, Mapping):
            return {name: visit(child, (*path, name)) for name, child in node.items()}
        return node

    return visit(params, ())


def _slice_block(block: Mapping[str, Any], idx: np.ndarray) -> dict:
    block = {name: dict(sub) for name, sub in block.items()}
    if _is_attention(block):
        for name in ("query", "key", "value"):
            block[name]["kernel"] = np.asarray(block[name]["kernel"])[:, idx, :]
            if "bias" in block[name]:
                block[name]["bias"] = np.asarray(block[name]["bias"])[idx, :]
        block["out"]["kernel"] = np.asarray(block["out"]["kernel"])[idx, :, :]
    else:
        for name in MLP_INPUTS:
            if name in block:
                block[name]["kernel"] = np.asarray(block[name]["kernel"])[:, idx]
                if "bias" in block[name]:
                    block[name]["bias"] = np.asarray(block[name]["bias"])[idx]
        block["wo"]["kernel"] = np.asarray(block["wo"]["kernel"])[idx, :]
    return block


def _zero_block(block: Mapping[str, Any], idx: np.ndarray) -> dict:
    block = {name: dict(sub) for name, sub in block.items()}
    name, axis = ("out", 0) if _is_attention(block) else ("wo", 0)
    kernel = np.array(block[name]["kernel"])
    dropped = np.setdiff1d(np.arange(kernel.shape[axis]), idx)
    kernel[dropped] = 0.0  # what a removed unit or head adds to the output
    block[name]["kernel"] = kernel
    return block


def _check_prunable(cfg: TransformerConfig) -> None:
    if cfg.quantization:
        raise ValueError(f"the model is quantized ({cfg.quantization}); prune its float source, then quantize")


def _rewrite_blocks(
    params: Any,
    cfg: TransformerConfig,
    new_cfg: TransformerConfig,
    block_fn,
    ffn_fraction: float,
    heads_fraction: float,
) -> Any:
    """``block_fn(block, kept indices)`` applied to every MLP and attention block, in the unscanned layout; the result
    is returned in ``params``' layout (scanned by ``new_cfg`` when ``cfg`` scans a per-layer stack)."""
    _check_prunable(cfg)
    layered = cfg.scan_layers and not cfg.share_layers
    flat = network.unscan_params(params, cfg) if layered else params
    kept = select_kept(flat, cfg, ffn_fraction=ffn_fraction, heads_fraction=heads_fraction)
    rewritten = _map_blocks(flat, kept, block_fn)
    return network.scan_params(rewritten, new_cfg) if layered else rewritten


def prune_params(
    params: Any, cfg: TransformerConfig, *, ffn_fraction: float, heads_fraction: float
) -> tuple[Any, TransformerConfig]:
    """The smaller model: parameters without the pruned units and heads, and its config."""
    new_cfg = cfg.replace(
        d_ff=cfg.d_ff - pruned_count(cfg.d_ff, ffn_fraction, "FFN units"),
        num_heads=cfg.num_heads - pruned_count(cfg.num_heads, heads_fraction, "attention heads"),
        d_kv=cfg.head_dim,
    )
    return _rewrite_blocks(params, cfg, new_cfg, _slice_block, ffn_fraction, heads_fraction), new_cfg


def zero_pruned(params: Any, cfg: TransformerConfig, *, ffn_fraction: float, heads_fraction: float) -> Any:
    """The same-shaped model with the units and heads that ``prune_params`` removes zeroed (computes the same)."""
    return _rewrite_blocks(params, cfg, cfg, _zero_block, ffn_fraction, heads_fraction)
