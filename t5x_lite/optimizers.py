"""Optimizers from a config: T5X's Adafactor (``adafactor.py``, factored by logical axes), AdamW (optax); T5's
rsqrt decay, linear warmup + cosine, Vaswani's inverse square root, constant; global-norm clipping; weight-decay masks.

Usage::

    tx = make_optimizer(config, logical_axes=network.param_logical_axes(model_cfg))  # config: dict or ConfigDict
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    learning_rate = make_schedule(config)(step)  # the value the optimizer used at ``step``, for logging

Config keys (every one optional; other keys, e.g. those of a whole run config, are ignored):

==================  ============  ==================================================================================
key                 default       meaning
==================  ============  ==================================================================================
optimizer           'adafactor'   'adafactor' | 'adamw'
learning_rate       1e-3          base of the schedule (for 'rsqrt' T5's base: 1.0 gives 0.01 for warmup_steps=1e4)
schedule            'rsqrt'       'rsqrt' | 'cosine' | 'inverse_sqrt' | 'warmup_rsqrt' | 'constant'
warmup_steps        10000         rsqrt: constant-lr plateau length; others: linear warmup length
linear_warmup       False         rsqrt / constant: ramp linearly from 0 over warmup_steps
decay_steps         None          cosine: total length incl. warmup (None: the config's num_train_steps)
end_factor          0.0           cosine: final learning rate = end_factor * learning_rate
cooldown_steps      0             any schedule: times a linear decay to 0 over the last cooldown_steps of
                                  num_train_steps (warmup-stable-decay); 0 turns it off
d_model             512           inverse_sqrt: model width in d_model**-0.5
weight_decay        0.0           adamw: decoupled decay times the lr; adafactor: decay rate per step (not lr-scaled)
b1, b2, eps         0.9, 0.98,    adamw moments and epsilon (Vaswani et al. 2017's Adam settings)
                    1e-9
grad_clip_norm      0.0           clip gradients to this global norm before the optimizer; 0 turns it off
decay_rate          0.8           adafactor: second-moment decay 1 - (step + 1) ** -decay_rate
clipping_threshold  1.0           adafactor: update clipping (block RMS); 0 or None turns it off
==================  ============  ==================================================================================

Weight decay never touches biases, norm scales or 1-D parameters (``decay_mask``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5x_lite import adafactor, sparsity

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "inverse_sqrt", "warmup_rsqrt", "constant")

DEFAULTS: dict[str, Any] = {
    "optimizer": "adafactor",
    "learning_rate": 1e-3,
    "schedule": "rsqrt",
    "warmup_steps": 10000,
    "linear_warmup": False,
    "decay_steps": None,
    "end_factor": 0.0,
    "cooldown_steps": 0,
    "d_model": 512,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.98,
    "eps": 1e-9,
    "grad_clip_norm": 0.0,
    "decay_rate": 0.8,
    "clipping_threshold": 1.0,
    "prune_sparsity": 0.0,  # unstructured magnitude pruning (t5x_lite.sparsity): the final fraction of zeros
    "prune_start_step": 0,
    "prune_end_step": 0,
}


def _options(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The optimizer keys of ``cfg`` (dict, ConfigDict or FrozenConfigDict) over ``DEFAULTS``."""
    get = cfg.get if hasattr(cfg, "get") else lambda key, default: getattr(cfg, key, default)
    options = {key: get(key, default) for key, default in DEFAULTS.items()}
    options["num_train_steps"] = get("num_train_steps", None)
    return options


def _choose(options: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = options[key]
    if value not in choices:
        raise ValueError(f"config.{key}={value!r} is unknown; choose one of {', '.join(choices)}")
    return value


def _non_negative_int(options: dict[str, Any], key: str) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"config.{key}={value!r} must be a non-negative integer")
    return int(value)


def make_schedule(cfg: Mapping[str, Any] | Any) -> optax.Schedule:
    """``_base_schedule``, times a linear cooldown to 0 over the last ``cooldown_steps`` of ``num_train_steps``."""
    options = _options(cfg)
    schedule = _base_schedule(options)
    cooldown = _non_negative_int(options, "cooldown_steps")
    if not cooldown:
        return schedule
    total = options["num_train_steps"]
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or not 0 < cooldown <= total:
        raise ValueError(
            f"config.cooldown_steps={cooldown} needs num_train_steps >= cooldown_steps (got num_train_steps={total!r})"
        )

    def cooled(step: Any) -> jax.Array:
        factor = jnp.clip((int(total) - jnp.asarray(step, jnp.float32)) / cooldown, 0.0, 1.0)
        return schedule(step) * factor

    return cooled


def _base_schedule(options: dict[str, Any]) -> optax.Schedule:
    """The learning rate as a function of the step (finite at step 0) for ``options['schedule']``:

    - ``rsqrt`` (T5): ``lr / sqrt(max(step, warmup_steps))``, times ``min(step / warmup_steps, 1)`` if linear_warmup;
    - ``cosine``: linear 0 -> lr over warmup_steps, then cosine to ``end_factor * lr`` at step decay_steps;
    - ``inverse_sqrt`` (Vaswani et al. 2017): ``lr * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)``;
    - ``warmup_rsqrt`` (fairseq's ``inverse_sqrt``, ``lr`` is the peak): ``lr * min(step / warmup_steps,
      sqrt(warmup_steps / step))``;
    - ``constant``: ``lr``, times ``min(step / warmup_steps, 1)`` if linear_warmup.
    """
    name = _choose(options, "schedule", SCHEDULES)
    base = options["learning_rate"]
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0:
        raise ValueError(f"config.learning_rate={base!r} must be a positive number")
    base = float(base)
    warmup = _non_negative_int(options, "warmup_steps")
    ramp = bool(options["linear_warmup"]) and warmup > 0

    def warmup_factor(step: jax.Array) -> jax.Array:
        return jnp.minimum(step / warmup, 1.0) if ramp else jnp.ones_like(step)

    if name == "constant":
        return lambda step: base * warmup_factor(jnp.asarray(step, jnp.float32))

    if name == "rsqrt":
        floor = float(max(warmup, 1))

        def rsqrt(step: Any) -> jax.Array:
            step = jnp.asarray(step, jnp.float32)
            return base * jax.lax.rsqrt(jnp.maximum(step, floor)) * warmup_factor(step)

        return rsqrt

    if name in ("inverse_sqrt", "warmup_rsqrt") and warmup < 1:
        raise ValueError(f"config.warmup_steps={warmup} must be at least 1 for schedule={name!r}")
    if name == "warmup_rsqrt":

        def warmup_rsqrt(step: Any) -> jax.Array:
            step = jnp.asarray(step, jnp.float32)
            return base * jnp.minimum(step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1.0)))

        return warmup_rsqrt

    if name == "inverse_sqrt":
        d_model = options["d_model"]
        if isinstance(d_model, bool) or not isinstance(d_model, numbers.Integral) or d_model < 1:
            raise ValueError(f"config.d_model={d_model!r} must be a positive integer (schedule='inverse_sqrt')")
        scale = base * int(d_model) ** -0.5

        def inverse_sqrt(step: Any) -> jax.Array:
            step = jnp.asarray(step, jnp.float32)
            return scale * jnp.minimum(jax.lax.rsqrt(jnp.maximum(step, 1.0)), step * warmup**-1.5)

        return inverse_sqrt

    # cosine
    decay_steps = options["decay_steps"] if options["decay_steps"] is not None else options["num_train_steps"]
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, numbers.Integral) or decay_steps <= warmup:
        raise ValueError(
            f"config.decay_steps={decay_steps!r} must be an integer above warmup_steps={warmup} for schedule='cosine' "
            "(the total schedule length including warmup; None falls back to num_train_steps)"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base,
        warmup_steps=warmup,
        decay_steps=int(decay_steps),
        end_value=float(options["end_factor"]) * base,
    )


def _leaf_name(path: tuple[Any, ...]) -> str:
    for key in reversed(path):
        name = getattr(key, "key", None)
        if name is None:
            name = getattr(key, "name", None)
        if isinstance(name, str):
            return name
    return ""


def decay_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: True where weight decay applies, False for names ending in 'bias' or
    'scale' and for parameters of fewer than 2 dimensions. Works on arrays, ShapeDtypeStructs and boxed params."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
        name = _leaf_name(path)
        return len(getattr(value, "shape", ())) >= 2 and not name.endswith(("bias", "scale"))

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def make_optimizer(
    cfg: Mapping[str, Any] | Any, params: Any = None, logical_axes: Any = None
) -> optax.GradientTransformation:
    """``cfg.optimizer`` driven by ``make_schedule(cfg)``, after global-norm clipping when ``grad_clip_norm > 0``.

    ``params`` (arrays or abstract shapes) only fixes the weight-decay mask early; without it the mask is computed
    from the parameters at ``init``. ``logical_axes`` (``network.param_logical_axes``) tells Adafactor how to factor
    each parameter, as T5X does; without it Adafactor factors the two largest dimensions (optax's heuristic).
    """
    options = _options(cfg)
    name = _choose(options, "optimizer", OPTIMIZERS)
    schedule = make_schedule(cfg)
    weight_decay = float(options["weight_decay"])
    if weight_decay < 0:
        raise ValueError(f"config.weight_decay={weight_decay!r} must be non-negative")
    mask = decay_mask(params) if params is not None else decay_mask
    if name == "adafactor":
        threshold = options["clipping_threshold"]
        tx = adafactor.adafactor(
            learning_rate=schedule,
            logical_axes=logical_axes,
            decay_rate=float(options["decay_rate"]),
            clipping_threshold=float(threshold) if threshold else None,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=mask if weight_decay else None,
        )
    else:
        tx = optax.adamw(
            learning_rate=schedule,
            b1=float(options["b1"]),
            b2=float(options["b2"]),
            eps=float(options["eps"]),
            weight_decay=weight_decay,
            mask=mask,
        )
    clip = float(options["grad_clip_norm"] or 0.0)
    if clip < 0 or math.isnan(clip):
        raise ValueError(f"config.grad_clip_norm={clip!r} must be >= 0 (0 turns clipping off)")
    tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
    if options["prune_sparsity"]:  # gradual magnitude pruning on top of the update (Zhu & Gupta 2017)
        return sparsity.magnitude_pruning(
            tx,
            float(options["prune_sparsity"]),
            _non_negative_int(options, "prune_start_step"),
            _non_negative_int(options, "prune_end_step"),
        )
    return tx
