"""TrainState and the pure train / eval step functions, jit-compiled with shardings and the state donated.

Usage::

    tx = optimizers.make_optimizer(config, logical_axes=network.param_logical_axes(model_cfg))
    mesh, rules = partitioning.make_mesh(config.mesh_shape), config.partitioning
    state = create_train_state(model_cfg, tx, jax.random.key(config.seed), mesh, rules)
    step = compile_train_step(model_cfg, tx, mesh, rules, num_microbatches=2, schedule=optimizers.make_schedule(config))
    with partitioning.activate(mesh, rules):
        state, metrics = step(state, batch, jax.random.key(config.seed))  # `state` passed in is donated

The loss is built from ``losses.cross_entropy`` *sums*: microbatches accumulate sums of the loss and of its
gradient, and normalize once, so any number of microbatches gives the update of the full batch. See
docs/training.md ("Train step").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite import adafactor, lora, losses, network, partitioning, quantization

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates: an immutable pytree, so steps are pure and the state can be donated."""

    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any
    opt_state: optax.OptState


# --------------------------------------------------------------------------------------------------------------
# State: shardings and initialization.
# --------------------------------------------------------------------------------------------------------------


def _kept_dims(param_shape: tuple[int, ...], leaf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The parameter dimensions a statistic of ``leaf_shape`` keeps when it is the parameter with some dimensions
    reduced away (the first match, in order), or None if it is not."""
    if not 0 < len(leaf_shape) < len(param_shape):
        return None
    kept: list[int] = []
    for dim, size in enumerate(param_shape):
        if len(kept) < len(leaf_shape) and size == leaf_shape[len(kept)]:
            kept.append(dim)
    return tuple(kept) if len(kept) == len(leaf_shape) else None


def _opt_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, shardings: Any, mesh: Mesh) -> Any:
    """Sharding of every optimizer-state leaf, derived from the parameter it belongs to.

    ``jax.eval_shape(optimizer.init, params)`` gives the state's shapes without computing it. A leaf whose path ends
    with a parameter's path (``mu/encoder/...``, ``v_row/encoder/...``) belongs to that parameter: the same shape
    takes the parameter's sharding (Adam moments, unfactored Adafactor moments); the parameter with dimensions
    reduced away (Adafactor's row/column statistics) keeps the specs of the dimensions that remain. Anything else
    (step counts, placeholders) is replicated: it is small.
    """
    flat_params = {
        adafactor.path_names(path): (leaf, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params_shape)[0], jax.tree.leaves(shardings), strict=True
        )
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def derive(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = adafactor.path_names(path)
        for start in range(len(names)):
            match = flat_params.get(names[start:])
            if match is None:
                continue
            param, sharding = match
            spec = tuple(sharding.spec) + (None,) * (len(param.shape) - len(sharding.spec))
            if tuple(leaf.shape) == tuple(param.shape):
                return sharding
            kept = _kept_dims(tuple(param.shape), tuple(leaf.shape))
            if kept is None:
                return replicated
            return NamedSharding(mesh, PartitionSpec(*(spec[d] for d in kept)))
        return replicated

    return jax.tree_util.tree_map_with_path(derive, jax.eval_shape(optimizer.init, params_shape))


def state_shardings(
    model_cfg: network.TransformerConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: str | partitioning.Rules,
) -> TrainState:
    """``NamedSharding`` of every leaf of the ``TrainState`` (a TrainState of shardings): the parameters by the
    logical-axis rules, the optimizer state like its parameters, the step replicated."""
    shardings = partitioning.param_shardings(model_cfg, mesh, rules)
    if model_cfg.quantization:  # QLoRA: the stored tree, quantized base weights as {"qvalue", "scale"} dicts
        params_shape = network.stored_params(model_cfg)
    else:
        params_shape = quantization.unbox_shapes(network.abstract_params(model_cfg))
    return TrainState(
        step=NamedSharding(mesh, PartitionSpec()),
        params=shardings,
        opt_state=_opt_state_shardings(optimizer, params_shape, shardings, mesh),
    )


def create_train_state(
    model_cfg: network.TransformerConfig,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh | None = None,
    rules: str | partitioning.Rules | None = None,
) -> TrainState:
    """A fresh ``TrainState`` at step 0. With a mesh, every array is created directly in its shards
    (``state_shardings``); without one, on the default device. The parameters are the same either way."""
    if mesh is None:
        params = network.init_params(model_cfg, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params))
    if rules is None:
        raise ValueError("create_train_state: a mesh needs rules too, e.g. rules='fsdp' (see partitioning.RULES)")
    shardings = state_shardings(model_cfg, optimizer, mesh, rules)
    params = partitioning.init_params_sharded(model_cfg, rng, mesh, rules)
    opt_state = jax.jit(optimizer.init, in_shardings=(shardings.params,), out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


# --------------------------------------------------------------------------------------------------------------
# Loss.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Word-level distillation from a teacher run inside the train step (``losses.distillation_cross_entropy``)."""

    teacher_cfg: network.TransformerConfig
    temperature: float = 1.0
    weight: float = 0.5


def _forward(
    model_cfg: network.TransformerConfig,
    params: Any,
    batch: Batch,
    dropout_rng: jax.Array | None,
    return_hidden: bool = False,
) -> jax.Array:
    """Teacher-forced logits (or, with ``return_hidden``, final hidden states) of one (micro)batch."""
    return network.build_model(model_cfg).apply(
        {"params": network.runtime_params(model_cfg, params)},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"),
        batch.get("encoder_positions"),
        batch.get("decoder_positions"),
        enable_dropout=dropout_rng is not None,
        return_hidden=return_hidden,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
    )


def _loss_sums(
    params: Any,
    batch: Batch,
    model_cfg: network.TransformerConfig,
    dropout_rng: jax.Array | None,
    label_smoothing: float,
    z_loss: float,
    loss_chunk_tokens: int = 0,
    teacher_logits: jax.Array | None = None,
    distillation: Distillation | None = None,
) -> dict[str, jax.Array]:
    """``losses.cross_entropy`` sums of one (micro)batch; dropout on iff ``dropout_rng`` is given.
    ``loss_chunk_tokens`` > 0 fuses the output projection into the loss (``losses.projected_cross_entropy``);
    ``teacher_logits`` with ``distillation`` give the distillation loss instead."""
    # fused only where the projection is a plain matrix (output_projection is None when the model's own computes more)
    projection = network.output_projection(model_cfg, params) if loss_chunk_tokens > 0 else None
    outputs = _forward(model_cfg, params, batch, dropout_rng, return_hidden=projection is not None)
    if teacher_logits is not None:
        return losses.distillation_cross_entropy(
            outputs,
            teacher_logits,
            batch["decoder_target_tokens"],
            batch.get("decoder_loss_weights"),
            temperature=distillation.temperature,
            distill_weight=distillation.weight,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
    if projection is not None:
        return losses.projected_cross_entropy(
            outputs,
            projection,
            batch["decoder_target_tokens"],
            batch.get("decoder_loss_weights"),
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            chunk_tokens=loss_chunk_tokens,
        )
    return losses.cross_entropy(
        outputs,
        batch["decoder_target_tokens"],
        batch.get("decoder_loss_weights"),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )


def _denominator(weight_sum: jax.Array, normalization: str | float) -> jax.Array:
    """What ``losses.normalize`` divides the loss by (validated there)."""
    if isinstance(normalization, str):
        return jnp.where(weight_sum > 0, weight_sum, 1.0)
    return jnp.asarray(normalization, jnp.float32)


def loss_fn(
    params: Any,
    batch: Batch,
    model_cfg: network.TransformerConfig,
    dropout_rng: jax.Array | None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalization: str | float = losses.NUM_REAL_TARGET_TOKENS,
) -> tuple[jax.Array, Metrics]:
    """Normalized loss of one batch and its metrics (``loss``, ``z_loss``, ``accuracy``, ``weight_sum``);
    ``dropout_rng=None`` turns dropout off. Differentiable in ``params`` (``jax.grad(..., has_aux=True)``)."""
    sums = _loss_sums(params, batch, model_cfg, dropout_rng, label_smoothing, z_loss)
    metrics = losses.normalize(sums, normalization)
    metrics["weight_sum"] = sums["weight_sum"]
    return metrics["loss"], metrics


# --------------------------------------------------------------------------------------------------------------
# Steps.
# --------------------------------------------------------------------------------------------------------------


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[batch, ...] -> [num_microbatches, batch // num_microbatches, ...]; microbatch i is a contiguous block of
    rows, and each keeps the batch sharding of the whole (a logical constraint, a no-op without rules)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"num_microbatches={num_microbatches} does not divide the batch size {x.shape[0]}; use a "
                f"num_microbatches that divides {x.shape[0]} (and the per-device batch)"
            )
        x = x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    teacher_params: Any = None,
    *,
    model_cfg: network.TransformerConfig,
    optimizer: optax.GradientTransformation,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalization: str | float = losses.NUM_REAL_TARGET_TOKENS,
    schedule: optax.Schedule | None = None,
    skip_nonfinite: bool = False,
    loss_chunk_tokens: int = 0,
    distillation: Distillation | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on ``batch``; returns the new state and scalar metrics.

    With ``distillation`` the loss is the distillation loss against the teacher (``teacher_params``, run without
    dropout on each microbatch inside this step); the student's logits are then computed whole.

    With ``skip_nonfinite``, an update whose loss or gradient is not finite is dropped (parameters and optimizer
    state unchanged, the step still counted) and metrics report ``skipped`` = 1.

    The gradient is that of the normalized loss of the whole batch, computed as the sum over ``num_microbatches``
    microbatches (``lax.scan``) of the gradients of the loss *sums*, divided once by the normalizer: peak memory is
    one microbatch's activations, and the result equals the full batch's. Dropout keys are
    ``fold_in(fold_in(rng, step), microbatch)``, so a run is a function of (rng, step) and resumes exactly.
    Metrics: ``loss``, ``z_loss``, ``accuracy``, ``weight_sum`` (real target tokens), ``grad_norm`` (of the
    normalized gradient, before any clipping in the optimizer) and, given ``schedule``, ``learning_rate`` (the value
    used for this update).
    """
    losses.normalize({"loss": 0.0, "z_loss": 0.0, "weight_sum": 1.0, "correct": 0.0}, normalization)  # validate
    if (distillation is None) != (teacher_params is None):
        raise ValueError("train_step: give both distillation and teacher_params, or neither")
    step_rng = jax.random.fold_in(rng, state.step)
    use_dropout = model_cfg.uses_dropout

    def sums_and_grads(params: Any, microbatch: Batch, index: jax.Array) -> tuple[dict[str, jax.Array], Any]:
        dropout_rng = jax.random.fold_in(step_rng, index) if use_dropout else None
        teacher_logits = None
        if distillation is not None:
            teacher_logits = jax.lax.stop_gradient(_forward(distillation.teacher_cfg, teacher_params, microbatch, None))

        def loss_sum(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            sums = _loss_sums(
                params,
                microbatch,
                model_cfg,
                dropout_rng,
                label_smoothing,
                z_loss,
                0 if distillation is not None else loss_chunk_tokens,
                teacher_logits,
                distillation,
            )
            return sums["loss"], sums

        if not model_cfg.lora_rank:
            (_, sums), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
            return sums, grads
        # LoRA: differentiate with respect to the adapters only (no weight-gradient matmuls for the base); the
        # base's gradient is zero, and adapters_only gives it no update
        adapters, rebuild = lora.split(params)
        (_, sums), adapter_grads = jax.value_and_grad(lambda a: loss_sum(rebuild(a)), has_aux=True)(adapters)
        return sums, lora.full_gradient(adapter_grads, params)

    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be a positive integer")
    if num_microbatches == 1:
        sums, grad_sum = sums_and_grads(state.params, batch, jnp.zeros((), jnp.int32))
    else:
        microbatches = _split_microbatches(batch, num_microbatches)
        zero_sums = {key: jnp.zeros((), jnp.float32) for key in ("loss", "z_loss", "weight_sum", "correct")}
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)

        def accumulate(carry: tuple[Any, Any], inputs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, Any], None]:
            sums, grads = sums_and_grads(state.params, *inputs)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None

        indices = jnp.arange(num_microbatches, dtype=jnp.int32)
        (sums, grad_sum), _ = jax.lax.scan(accumulate, (zero_sums, zero_grads), (microbatches, indices))

    denominator = _denominator(sums["weight_sum"], normalization)
    grads = jax.tree.map(lambda g: (g / denominator).astype(g.dtype), grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = losses.normalize(sums, normalization)
    metrics["weight_sum"] = sums["weight_sum"]
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    if skip_nonfinite:
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    params: Any,
    batch: Batch,
    *,
    model_cfg: network.TransformerConfig,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalization: str | float = losses.NUM_REAL_TARGET_TOKENS,
    loss_chunk_tokens: int = 0,
) -> Metrics:
    """Metrics of one batch without dropout: this batch's normalized ``loss``, ``z_loss`` and ``accuracy``, and the
    sums (``loss_sum``, ``z_loss_sum``, ``correct``, ``weight_sum``) to add over batches and normalize once."""
    sums = _loss_sums(params, batch, model_cfg, None, label_smoothing, z_loss, loss_chunk_tokens)
    metrics = losses.normalize(sums, normalization)
    metrics.update(
        loss_sum=sums["loss"], z_loss_sum=sums["z_loss"], correct=sums["correct"], weight_sum=sums["weight_sum"]
    )
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Compilation with shardings.
# --------------------------------------------------------------------------------------------------------------


def compile_train_step(
    model_cfg: network.TransformerConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: str | partitioning.Rules,
    *,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalization: str | float = losses.NUM_REAL_TARGET_TOKENS,
    schedule: optax.Schedule | None = None,
    skip_nonfinite: bool = False,
    loss_chunk_tokens: int = 0,
    distillation: Distillation | None = None,
    teacher_params: Any = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``train_step`` jit-compiled for ``mesh``: the state sharded by ``state_shardings`` and donated (argument 0;
    do not reuse the state passed in), the batch by ``partitioning.batch_sharding``, the rng and the metrics
    replicated. Call it inside ``partitioning.activate(mesh, rules)`` so the model's logical constraints apply.
    With ``distillation``, ``teacher_params`` are placed by the teacher's parameter shardings and bound as the
    step's last argument (an input of the program, not a constant folded into it)."""
    shardings = state_shardings(model_cfg, optimizer, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(
        train_step,
        model_cfg=model_cfg,
        optimizer=optimizer,
        num_microbatches=num_microbatches,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        normalization=normalization,
        schedule=schedule,
        skip_nonfinite=skip_nonfinite,
        loss_chunk_tokens=loss_chunk_tokens,
        distillation=distillation,
    )
    in_shardings = (shardings, partitioning.batch_sharding(mesh, rules), replicated)
    options = train_compiler_options(model_cfg, mesh)
    if distillation is None:
        return jax.jit(
            step,
            in_shardings=in_shardings,
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
            compiler_options=options,
        )
    teacher_shardings = partitioning.param_shardings(distillation.teacher_cfg, mesh, rules)
    jitted = jax.jit(
        step,
        in_shardings=(*in_shardings, teacher_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
        compiler_options=options,
    )
    return _WithTeacher(jitted, jax.device_put(teacher_params, teacher_shardings))


# XLA:CPU's YNNPACK fusions of elementwise ops, on top of its default (single dots only).
YNN_ELEMENTWISE = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
}


def train_compiler_options(model_cfg: network.TransformerConfig, mesh: Mesh) -> dict[str, str] | None:
    """XLA options for the train step of ``model_cfg`` on ``mesh`` (None: XLA's defaults).

    A LoRA step on a CPU gets ``YNN_ELEMENTWISE``. Differentiating with respect to the adapters alone leaves the
    backward pass's elementwise chain (layer-norm and dropout gradients) with only small rank-R dots as consumers, and
    with XLA:CPU's defaults its loop fusions then recompute that chain across layers, inside transposing copies, at
    most batch shapes (all but a few power-of-two ones): in the train command 0.90-1.34 s a step against 0.44-0.56 s
    for full fine-tuning (QUIET, docs/compression.md). YNNPACK's elementwise fusions materialize the chain and bring
    the LoRA step back to full fine-tuning's time. Full fine-tuning keeps the defaults: the option made its step
    slower (0.65 against 0.57 s, mean over the eight Multi30k bucket shapes, three interleaved QUIET runs,
    2026-12-04)."""
    if model_cfg.lora_rank and mesh.devices.flat[0].platform == "cpu" and _xla_accepts(tuple(YNN_ELEMENTWISE.items())):
        return dict(YNN_ELEMENTWISE)
    return None


@functools.cache
def _xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's compiler knows ``options`` ((name, value) pairs): an experimental flag may be renamed or
    dropped in a later release, and then the step compiles with XLA's defaults, slower but correct, with a warning."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception as error:  # XLA answers an unknown option or value with INVALID_ARGUMENT
        logging.warning("XLA options %s not accepted (%s): compiling with XLA's defaults", options, error)
        return False
    return True


class _WithTeacher:
    """A jitted train step with the teacher's parameters bound as its last argument; ``lower(...).compile()``
    gives a step with the same binding, as ``precompile_train_step`` expects."""

    def __init__(self, function: Any, teacher_params: Any) -> None:
        self.function, self.teacher_params = function, teacher_params

    def __call__(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        return self.function(state, batch, rng, self.teacher_params)

    def lower(self, state: Any, batch: Any, rng: Any) -> _WithTeacher:
        return _WithTeacher(self.function.lower(state, batch, rng, self.teacher_params), self.teacher_params)

    def compile(self) -> _WithTeacher:
        return _WithTeacher(self.function.compile(), self.teacher_params)


def compile_eval_step(
    model_cfg: network.TransformerConfig,
    mesh: Mesh,
    rules: str | partitioning.Rules,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalization: str | float = losses.NUM_REAL_TARGET_TOKENS,
    loss_chunk_tokens: int = 0,
) -> Callable[[Any, Batch], Metrics]:
    """``eval_step`` jit-compiled for ``mesh`` (parameters as in training, batch sharded, metrics replicated)."""
    step = functools.partial(
        eval_step,
        model_cfg=model_cfg,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        normalization=normalization,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    return jax.jit(
        step,
        in_shardings=(partitioning.param_shardings(model_cfg, mesh, rules), partitioning.batch_sharding(mesh, rules)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def precompile_train_step(
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    state: TrainState,
    batch_shapes: list[dict[str, tuple[int, ...]]],
    mesh: Mesh,
    rules: str | partitioning.Rules,
    *,
    threads: int = 2,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``train_step`` (from ``compile_train_step``) compiled ahead of time for every batch shape, ``threads`` at a
    time (XLA compiles one program on one core), so that no step of a length-bucketed run waits for a compilation.
    The returned function dispatches on the batch's shapes; a shape not listed compiles on first use as before.
    Shapes map feature names to global [rows, length] shapes; ``decoder_loss_weights`` is float32, the rest int32."""
    from concurrent.futures import ThreadPoolExecutor

    sharding = partitioning.batch_sharding(mesh, rules)
    rng = jax.random.key(0)

    def signature(batch: Any) -> tuple:
        return tuple(sorted((name, tuple(value.shape)) for name, value in batch.items()))

    def compile_one(shapes: dict[str, tuple[int, ...]]):
        batch = {
            name: jax.ShapeDtypeStruct(
                shape, jnp.float32 if name == "decoder_loss_weights" else jnp.int32, sharding=sharding
            )
            for name, shape in shapes.items()
        }
        return signature(batch), train_step.lower(state, batch, rng).compile()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        compiled = dict(pool.map(compile_one, batch_shapes))

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        function = compiled.get(signature(batch))
        return function(state, batch, rng) if function is not None else train_step(state, batch, rng)

    return step
