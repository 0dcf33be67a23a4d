"""Unstructured magnitude pruning during training, with Zhu & Gupta (2017)'s gradual sparsity schedule.

``magnitude_pruning`` wraps an optimizer: after each update every prunable weight (a dense kernel; embeddings, norms
and biases stay dense) keeps only its largest-magnitude entries, a fraction ``sparsity_at(step)`` of the others set
to zero. The schedule rises as a cubic from 0 at ``start_step`` to ``final_sparsity`` at ``end_step`` and stays
there, so the weights that remain can recover from each small cut (fine-tuning after pruning happens in the same
run). The matrices stay dense in memory: the result is smaller only when compressed (zeros) or sparse-stored.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def check(final_sparsity: float, start_step: int, end_step: int) -> None:
    """ValueError unless 0 <= sparsity < 1 and, when pruning, 0 <= start_step < end_step."""
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"config.prune_sparsity={final_sparsity!r} must be in [0, 1)")
    if final_sparsity and not 0 <= start_step < end_step:
        raise ValueError(
            f"config.prune_start_step={start_step!r} and prune_end_step={end_step!r}: pruning needs "
            "0 <= prune_start_step < prune_end_step (the steps over which the sparsity rises)"
        )


def sparsity_at(step: jax.Array | int, final_sparsity: float, start_step: int, end_step: int) -> jax.Array:
    """Zhu & Gupta's schedule: ``final * (1 - (1 - progress)^3)``, progress from 0 at ``start_step`` to 1 at
    ``end_step`` (clipped)."""
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / (end_step - start_step), 0.0, 1.0)
    return final_sparsity * (1.0 - (1.0 - progress) ** 3)


def prunable(path: tuple[Any, ...], leaf: Any) -> bool:
    """Dense-layer kernels (``.../kernel``, two or more axes); embeddings, norms, biases and adapters are kept."""
    return bool(path) and str(getattr(path[-1], "key", path[-1])) == "kernel" and jnp.ndim(leaf) >= 2


def prune_by_magnitude(weight: jax.Array, sparsity: jax.Array) -> jax.Array:
    """``weight`` with its ``floor(sparsity * size)`` smallest-magnitude entries set to zero."""
    magnitude = jnp.abs(weight).ravel()
    count = jnp.floor(sparsity * magnitude.size).astype(jnp.int32)
    threshold = jnp.sort(magnitude)[jnp.clip(count, 0, magnitude.size - 1)]
    keep = (jnp.abs(weight) >= threshold) | (count == 0)
    return jnp.where(keep, weight, jnp.zeros_like(weight))


class PruningState(NamedTuple):
    count: jax.Array  # updates applied so far
    inner: optax.OptState


def magnitude_pruning(
    inner: optax.GradientTransformation, final_sparsity: float, start_step: int, end_step: int
) -> optax.GradientTransformation:
    """``inner``, then every prunable weight cut to the scheduled sparsity by magnitude (needs ``params``)."""
    check(final_sparsity, start_step, end_step)

    def init(params: Any) -> PruningState:
        return PruningState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

    def update(updates: Any, state: PruningState, params: Any = None) -> tuple[Any, PruningState]:
        if params is None:
            raise ValueError("magnitude_pruning needs the parameters: call update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner, params)
        sparsity = sparsity_at(state.count + 1, final_sparsity, start_step, end_step)

        def cut(path: tuple[Any, ...], update: jax.Array, param: jax.Array) -> jax.Array:
            if not prunable(path, param):
                return update
            return prune_by_magnitude(param + update, sparsity) - param

        updates = jax.tree_util.tree_map_with_path(cut, updates, params)
        return updates, PruningState(count=state.count + 1, inner=inner_state)

    return optax.GradientTransformation(init, update)


def measured_sparsity(params: Any) -> float:
    """The fraction of zeros over every prunable weight of ``params``."""
    leaves = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if prunable(path, leaf)]
    zeros = sum(int(jnp.sum(leaf == 0)) for leaf in leaves)
    return zeros / max(1, sum(leaf.size for leaf in leaves))
