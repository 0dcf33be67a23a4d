"""Adafactor as T5X runs it: second moments factored by each parameter's logical axes, scanned layers kept apart.

optax's ``adafactor`` factors only the two largest dimensions of a parameter, so a 3-D attention kernel
[embed, heads, kv] keeps a full second moment (t5_small: 19.0M numbers of state for 60.5M parameters). T5X instead
reads the logical axis names: ``embed`` is a row, ``heads``/``kv``/``mlp``/``vocab`` are columns, so the attention
kernel is factored as an [embed, heads x kv] matrix; ``layers`` (scanned layers) is a batch dimension that no
statistic, parameter scale or clipping norm ever averages over, so each layer is updated exactly as if it were
not scanned. Parameters of rank <= 2 without a batch dimension use the classic heuristic (the two largest
dimensions, when the smaller of them has >= 128 entries), as T5X does.

Usage::

    tx = adafactor(learning_rate=schedule, logical_axes=network.param_logical_axes(model_cfg))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # params are required (parameter scale)

The update of one parameter ``p`` with gradient ``g`` at step ``t`` (0-based), following T5X's defaults (Shazeer
and Stern 2018): ``beta = 1 - (t + 1) ** -decay_rate``; ``G = g**2 + epsilon1``; factored:
``R = beta R + (1 - beta) mean_cols(G)``, ``C = beta C + (1 - beta) mean_rows(G)``,
``y = g / sqrt(R / mean_rows(R) * C)``; otherwise ``V = beta V + (1 - beta) G``, ``y = g / sqrt(V)``; then
``y /= max(1, rms(y) / clipping_threshold)`` and ``p -= lr * max(rms(p), epsilon2) * y`` (``rms`` over the
non-batch dimensions), and ``p -= weight_decay_rate * p`` where the mask allows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROW, COLUMN, BATCH, NONE = "row", "column", "batch", "none"

# T5X's standard_logical_factor_rules, for the logical axis names t5x_lite's parameters carry.
LOGICAL_FACTOR_RULES: dict[str, str] = {
    "vocab": COLUMN,
    "embed": ROW,
    "mlp": COLUMN,
    "heads": COLUMN,
    "kv": COLUMN,
    "joined_kv": COLUMN,
    "relpos_buckets": NONE,
    "abspos_buckets": NONE,
    "layers": BATCH,
    "stack": BATCH,
}

MIN_DIM_SIZE_TO_FACTOR = 128
EPSILON1 = 1e-30  # added to squared gradients
EPSILON2 = 1e-3  # floor of the parameter scale


@dataclasses.dataclass(frozen=True)
class FactorPlan:
    """How one parameter is treated: the dimensions its RMS averages over (all but the batch ones) and, when
    factored, its row and column dimensions (``factored`` None: a full second moment)."""

    averaging_dims: tuple[int, ...]
    factored: tuple[tuple[int, ...], tuple[int, ...]] | None


def _heuristic(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The second-largest dimension as the row and the largest as the column, if the row has enough entries."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return (int(order[-2]),), (int(order[-1]),)


def factor_plan(
    shape: tuple[int, ...],
    axes: tuple[str | None, ...] | None,
    rules: dict[str, str] | None = None,
    min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
    name: str = "a parameter",
) -> FactorPlan:
    """The ``FactorPlan`` of a parameter of ``shape`` whose dimensions carry the logical ``axes`` (None: unknown,
    the heuristic). Rank <= 2 without a batch dimension: the heuristic, as in T5X. Otherwise rows and columns
    come from ``rules`` (``LOGICAL_FACTOR_RULES``); a parameter with no row or no column keeps a full moment."""
    shape = tuple(int(d) for d in shape)
    everything = tuple(range(len(shape)))
    if axes is None:
        return FactorPlan(everything, _heuristic(shape, min_dim_size_to_factor))
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} logical axes {axes} for a parameter of shape {shape}")
    rules = LOGICAL_FACTOR_RULES if rules is None else rules
    unknown = sorted({a for a in axes if a is not None and a not in rules})
    if unknown:
        raise ValueError(
            f"{name}: logical axes {unknown} have no Adafactor factor rule; add them to "
            f"adafactor.LOGICAL_FACTOR_RULES as one of {ROW!r}, {COLUMN!r}, {BATCH!r}, {NONE!r}"
        )
    kinds = tuple(NONE if a is None else rules[a] for a in axes)
    batch = tuple(i for i, k in enumerate(kinds) if k == BATCH)
    averaging = tuple(i for i in everything if i not in batch)
    if len(shape) <= 2 and not batch:
        return FactorPlan(averaging, _heuristic(shape, min_dim_size_to_factor))
    rows = tuple(i for i, k in enumerate(kinds) if k == ROW)
    cols = tuple(i for i, k in enumerate(kinds) if k == COLUMN)
    if rows and cols and NONE in kinds:
        raise ValueError(f"{name}: axes {axes} mix factored ({ROW}/{COLUMN}) and unfactored ({NONE}) dimensions")
    return FactorPlan(averaging, (rows, cols) if rows and cols else None)


class AdafactorState(NamedTuple):
    """Per parameter (trees shaped like the params): the row and column statistics of a factored parameter, the
    full second moment of an unfactored one; unused slots hold a (1,) placeholder, as in T5X."""

    count: jax.Array  # int32: updates applied so far
    v_row: Any
    v_col: Any
    v: Any


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices), as strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _axes_by_path(logical_axes: Any) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """{parameter path: its logical axis names} from a tree of PartitionSpecs or tuples of names."""
    if logical_axes is None:
        return {}
    is_spec = lambda x: isinstance(x, (jax.sharding.PartitionSpec, tuple))  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_spec)[0]
    return {path_names(path): tuple(spec) for path, spec in flat}


def adafactor(
    learning_rate: float | Callable[[Any], Any],
    logical_axes: Any = None,
    *,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    epsilon1: float = EPSILON1,
    epsilon2: float = EPSILON2,
    min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
    factor_rules: dict[str, str] | None = None,
    weight_decay_rate: float | None = None,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """T5X's Adafactor (no momentum) as an optax transformation; see the module docstring for the update.

    ``logical_axes``: a tree like the params of PartitionSpecs / tuples of logical axis names
    (``network.param_logical_axes``); parameters it does not name use the heuristic. ``weight_decay_mask``: a
    tree of bools, or a function of the params giving one.
    """
    axes_by_path = _axes_by_path(logical_axes)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def plans(params: Any) -> Any:
        def plan(path: tuple[Any, ...], p: Any) -> FactorPlan:
            names = path_names(path)
            return factor_plan(
                tuple(p.shape), axes_by_path.get(names), factor_rules, min_dim_size_to_factor, "/".join(names)
            )

        return jax.tree_util.tree_map_with_path(plan, params)

    def init(params: Any) -> AdafactorState:
        placeholder = lambda: jnp.zeros((1,), jnp.float32)  # noqa: E731

        def slots(p: Any, plan: FactorPlan) -> tuple[Any, Any, Any]:
            if plan.factored is None:
                return placeholder(), placeholder(), jnp.zeros(p.shape, jnp.float32)
            rows, cols = plan.factored
            return (
                jnp.zeros(np.delete(p.shape, cols), jnp.float32),
                jnp.zeros(np.delete(p.shape, rows), jnp.float32),
                placeholder(),
            )

        per_param = jax.tree.map(slots, params, plans(params))
        pick = lambda i: jax.tree.map(lambda _, s: s[i], params, per_param)  # noqa: E731
        return AdafactorState(jnp.zeros((), jnp.int32), pick(0), pick(1), pick(2))

    def update(updates: Any, state: AdafactorState, params: Any = None) -> tuple[Any, AdafactorState]:
        if params is None:
            raise ValueError("adafactor needs the params in update(grads, state, params) for its parameter scale")
        step = state.count.astype(jnp.float32) - step_offset
        beta = 1.0 - (step + 1.0) ** (-decay_rate)
        lr = schedule(state.count)
        mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        if mask is None:
            mask = jax.tree.map(lambda _: True, params)

        def one(g, p, plan: FactorPlan, v_row, v_col, v, decays):
            g = g.astype(jnp.float32)
            g2 = g * g + epsilon1
            if plan.factored is None:
                v = beta * v + (1.0 - beta) * g2
                y = g * jax.lax.rsqrt(v)
            else:
                rows, cols = plan.factored
                v_row = beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=cols)
                v_col = beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=rows)
                rows_in_v_row = tuple(d - sum(c < d for c in cols) for d in rows)
                row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=rows_in_v_row, keepdims=True))
                col_factor = jax.lax.rsqrt(v_col)
                y = g * jnp.expand_dims(row_factor, cols) * jnp.expand_dims(col_factor, rows)
            avg = plan.averaging_dims
            if clipping_threshold:
                rms_y = jnp.sqrt(jnp.mean(y * y, axis=avg, keepdims=True))
                y = y / jnp.maximum(1.0, rms_y / clipping_threshold)
            scale = lr
            if multiply_by_parameter_scale:
                p32 = p.astype(jnp.float32)
                scale = lr * jnp.maximum(jnp.sqrt(jnp.mean(p32 * p32, axis=avg, keepdims=True)), epsilon2)
            step_update = -scale * y
            if weight_decay_rate and decays:
                step_update = step_update - weight_decay_rate * p.astype(jnp.float32)
            return step_update.astype(p.dtype), v_row, v_col, v

        out = jax.tree.map(one, updates, params, plans(params), state.v_row, state.v_col, state.v, mask)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)  # noqa: E731
        return pick(0), AdafactorState(state.count + 1, pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)
