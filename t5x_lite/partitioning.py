"""Meshes, logical-axis rules and shardings: one model definition placed on one CPU, a GPU cluster or a TPU pod.

Layers name their axes logically (``('embed', 'mlp')``); a rule preset maps those names to the axes of a
``('data', 'fsdp', 'model')`` mesh. The mesh shape and the preset come from the config, so changing the
parallelism of a run never touches the model. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5x_lite import network

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both: FSDP is data parallel for activations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Rules are in order of precedence (flax): a logical axis takes its mesh axis only if that mesh axis is still
# free in the array. So in the activations [batch, length, embed] under 'fsdp', 'batch' takes ('data', 'fsdp')
# and 'embed' stays unsharded, while in the parameters [embed, mlp] 'embed' takes 'fsdp'.
_UNSHARDED: Rules = (
    ("length", None),
    ("kv", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
)
RULES: dict[str, Rules] = {
    # Parameters replicated on every device; each device holds its slice of the batch.
    "data_parallel": (
        ("batch", BATCH_AXES),
        ("embed", None),
        ("heads", None),
        ("mlp", None),
        ("vocab", None),
        *_UNSHARDED,
    ),
    # Parameters (and so optimizer state) split along d_model over 'fsdp', gathered layer by layer when used.
    "fsdp": (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("heads", None),
        ("mlp", None),
        ("vocab", None),
        *_UNSHARDED,
    ),
    # FSDP plus Megatron-style tensor parallelism: heads, d_ff and the vocabulary split over 'model'.
    "fsdp_tp": (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("heads", "model"),
        ("mlp", "model"),
        ("vocab", "model"),
        *_UNSHARDED,
    ),
}


def get_rules(rules: str | Rules) -> Rules:
    """The rules of a preset name (``'data_parallel'``, ``'fsdp'``, ``'fsdp_tp'``), or ``rules`` unchanged."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"partitioning={rules!r} is unknown; choose one of {', '.join(RULES)}")
        return RULES[rules]
    return tuple(tuple(rule) for rule in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
    """Context in which jit-compiled model code resolves its logical constraints on ``mesh`` under ``rules``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
        yield


# --------------------------------------------------------------------------------------------------------------
# Mesh.
# --------------------------------------------------------------------------------------------------------------


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'model')`` mesh over all ``devices`` (default: every device of every process).

    One entry may be -1: it takes the devices the others leave. The axes are ``AxisType.Auto``, so XLA
    propagates shardings from the parameters and the logical constraints (jax 0.10 defaults to Explicit).
    TPU devices of several slices (multi-slice) join along ``data`` over the data-center network, so that fsdp
    and model collectives stay inside a slice; a shape whose data axis is 1 takes it from ``fsdp``
    (``(1, -1, 1)`` on 2 slices of 256 chips -> ``(2, 256, 1)``).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    num_slices = len({getattr(device, "slice_index", 0) for device in devices})
    if num_slices > 1 and devices[0].platform == "tpu":
        device_array = _multi_slice_device_array(shape, devices, num_slices)
    else:  # allow_split_physical_axes: non-square meshes on TPU slices (a no-op elsewhere).
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_mesh_shape(mesh_shape: Sequence[int], count: int) -> tuple[int, ...]:
    """``mesh_shape`` with its -1 filled in for ``count`` devices; a ValueError says what does not fit."""
    shape = tuple(int(n) for n in mesh_shape)
    if len(shape) != len(MESH_AXES) or any(n == 0 or n < -1 for n in shape) or shape.count(-1) > 1:
        raise ValueError(
            f"mesh_shape={tuple(mesh_shape)} is invalid: give 3 positive sizes for {MESH_AXES}, one of which "
            "may be -1 (fill with the remaining devices), e.g. (-1, 1, 1)"
        )
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if count % known:
            raise ValueError(
                f"mesh_shape={shape} cannot fill {count} devices: {known} does not divide {count}; "
                f"choose sizes whose product divides {count}"
            )
        shape = tuple(count // known if n == -1 else n for n in shape)
    elif known != count:
        raise ValueError(
            f"mesh_shape={shape} needs {known} devices but there are {count}; use sizes whose product is "
            f"{count}, or -1 for one axis (e.g. (-1, 1, 1))"
        )
    return shape


def _multi_slice_device_array(shape: tuple[int, ...], devices: Sequence[Any], num_slices: int) -> np.ndarray:
    data, fsdp, model = shape
    if data % num_slices:
        if data == 1 and fsdp % num_slices == 0:
            data, fsdp = num_slices, fsdp // num_slices
        else:
            raise ValueError(
                f"mesh_shape={shape} on {num_slices} slices: the data axis ({data}) must be a multiple of the number "
                f"of slices (slices are joined along 'data'); use e.g. mesh_shape=({num_slices}, -1, {model})"
            )
    within_slice = (data // num_slices, fsdp, model)
    return mesh_utils.create_hybrid_device_mesh(
        within_slice, (num_slices, 1, 1), devices, allow_split_physical_axes=True
    )


# --------------------------------------------------------------------------------------------------------------
# Shardings.
# --------------------------------------------------------------------------------------------------------------


def logical_to_mesh_specs(logical_specs: Any, rules: str | Rules) -> Any:
    """A pytree of logical PartitionSpecs (``P('embed', 'mlp')``) -> the same tree of mesh PartitionSpecs."""
    return nn.logical_to_mesh(logical_specs, get_rules(rules))


def param_shardings(cfg: network.TransformerConfig, mesh: Mesh, rules: str | Rules) -> Any:
    """``NamedSharding`` for every parameter of ``cfg`` (same tree as the unboxed params; for QLoRA the stored tree,
    where a quantized weight's ``qvalue`` is split like the weight and its ``scale`` on the axes it keeps)."""
    shardings = nn.logical_to_mesh_sharding(network.param_logical_axes(cfg), mesh, get_rules(rules))
    if not (cfg.lora_rank and cfg.quantization):
        return shardings

    def stored(sharding: NamedSharding, shapes: Any) -> Any:
        def fit(shape: jax.ShapeDtypeStruct) -> NamedSharding:
            spec = tuple(sharding.spec) + (None,) * (len(shape.shape) - len(sharding.spec))
            # a scale has size 1 on the contracted axes: those are not split
            return NamedSharding(
                mesh, PartitionSpec(*(None if n == 1 else a for n, a in zip(shape.shape, spec, strict=True)))
            )

        return jax.tree.map(fit, shapes)

    return jax.tree.map(stored, shardings, network.stored_params(cfg))


def batch_shards(mesh: Mesh, rules: str | Rules | None = None) -> int:
    """Into how many pieces ``batch_sharding`` cuts the batch dimension (the product of its mesh axes)."""
    axes = BATCH_AXES if rules is None else _mesh_axes(get_rules(rules), "batch")
    return math.prod(dict(mesh.shape)[axis] for axis in axes)


def batch_sharding(mesh: Mesh, rules: str | Rules | None = None) -> NamedSharding:
    """Sharding of arrays whose leading dimension is the batch ([batch], [batch, length], ...)."""
    axes = BATCH_AXES if rules is None else _mesh_axes(get_rules(rules), "batch")
    return NamedSharding(mesh, PartitionSpec(axes or None))


def init_params_sharded(
    cfg: network.TransformerConfig,
    rng: jax.Array,
    mesh: Mesh,
    rules: str | Rules,
    input_length: int = 8,
    target_length: int = 8,
) -> Any:
    """Parameters initialized directly in their shards: jit with ``out_shardings``, so no device ever holds
    the whole model. Same values as ``network.init_params(cfg, rng)``."""
    rules = get_rules(rules)
    shardings = param_shardings(cfg, mesh, rules)
    # The dummy batch must split evenly over the batch axes; XLA drops the forward pass (only params are output).
    batch = math.prod(mesh.shape[axis] for axis in _mesh_axes(rules, "batch"))
    encoder_tokens = jnp.ones((batch, input_length), jnp.int32)
    decoder_tokens = jnp.ones((batch, target_length), jnp.int32)

    init = jax.jit(network.initializer(cfg, encoder_tokens, decoder_tokens), out_shardings=shardings)
    if cfg.lora_rank:
        # Qwix re-boxes each new adapter by unboxing the weight's box, which under a global mesh constrains the
        # 2-D adapter to the weight's 3-D sharding and fails. out_shardings places every parameter all the same.
        with nn.logical_axis_rules(rules):
            return init(rng)
    with activate(mesh, rules):
        return init(rng)


def _mesh_axes(rules: Rules, logical_name: str) -> tuple[str, ...]:
    """The mesh axes that ``rules`` give the logical axis ``logical_name`` (empty when unsharded)."""
    axes = nn.logical_to_mesh_axes((logical_name,), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


# --------------------------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------------------------


def validate(cfg: network.TransformerConfig, mesh: Mesh, global_batch_size: int, rules: str | Rules) -> None:
    """Raise a one-line ValueError, naming the value and the fix, when a sharded dimension does not split evenly
    over its mesh axes: the batch over data * fsdp, d_model over fsdp, heads / d_ff / vocab over model."""
    rules = get_rules(rules)
    mesh_shape = dict(mesh.shape)
    dims = [
        ("batch", "batch_size", global_batch_size),
        ("embed", "d_model", cfg.d_model),
        ("heads", "num_heads", cfg.num_heads),
        ("kv", "d_kv", cfg.head_dim),
        ("mlp", "d_ff", cfg.d_ff),
        ("vocab", "vocab_size", cfg.vocab_size),
        ("relpos_buckets", "relative_attention_num_buckets", cfg.relative_attention_num_buckets),
        ("abspos_buckets", "max_position_embeddings", cfg.max_position_embeddings),
    ]
    if cfg.scan_layers:
        dims += [("layers", "num_encoder_layers", cfg.num_encoder_layers)]
        dims += [("layers", "num_decoder_layers", cfg.num_decoder_layers)]
    for name, field, size in dims:
        axes = _mesh_axes(rules, name)
        missing = [axis for axis in axes if axis not in mesh_shape]
        if missing:
            raise ValueError(
                f"the rules map {name!r} to mesh axis {missing[0]!r}, which the mesh {mesh_shape} lacks; "
                f"use mesh axes {MESH_AXES} or fix the rules"
            )
        ways = math.prod(mesh_shape[axis] for axis in axes)
        if size % ways:
            product = " * ".join(f"{axis}={mesh_shape[axis]}" for axis in axes) + (
                f" = {ways}" if len(axes) > 1 else ""
            )
            whole = [preset for preset, preset_rules in RULES.items() if not _mesh_axes(preset_rules, name)]
            unshard = (
                f", or partitioning {' / '.join(repr(p) for p in whole)} that leaves {name!r} whole" if whole else ""
            )
            raise ValueError(
                f"{field}={size} is not divisible by {product}, the mesh {'axes' if len(axes) > 1 else 'axis'} "
                f"sharding {name!r} (mesh {mesh_shape}); use a {field} that is a multiple of {ways}, or a mesh_shape "
                f"where {' * '.join(axes)} divides {size}{unshard}"
            )


# --------------------------------------------------------------------------------------------------------------
# Multi-host.
# --------------------------------------------------------------------------------------------------------------


COORDINATOR_PORT_ENV = "T5X_LITE_COORDINATOR_PORT"  # SkyPilot runs: the port of the coordinator on node 0
DEFAULT_COORDINATOR_PORT = 8476


def cluster_environment() -> tuple[str, dict[str, Any]]:
    """Which launcher started this process as one of several, and ``jax.distributed.initialize``'s arguments.

    - ``slurm``: a SLURM job step of more than one task (``srun``); jax reads SLURM's variables itself.
    - ``skypilot``: a SkyPilot task on more than one node (``num_nodes``): one process per node, node 0
      (the first of ``SKYPILOT_NODE_IPS``) coordinating on port ``$T5X_LITE_COORDINATOR_PORT`` (8476).
    - ``tpu``: a Cloud TPU VM (a Google PCI device and libtpu): jax finds the slice's other hosts itself;
      on a single host it joins a one-process cluster, which jax recommends there too.
    - ``none``: one process (``T5X_LITE_DISTRIBUTED=0`` forces this).
    """
    if os.environ.get("T5X_LITE_DISTRIBUTED", "1") == "0":
        return "none", {}
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return "slurm", {}
    node_ips = os.environ.get("SKYPILOT_NODE_IPS", "").split()
    if len(node_ips) > 1 and "SKYPILOT_NODE_RANK" in os.environ:
        port = int(os.environ.get(COORDINATOR_PORT_ENV, DEFAULT_COORDINATOR_PORT))
        return "skypilot", dict(
            coordinator_address=f"{node_ips[0]}:{port}",
            num_processes=len(node_ips),
            process_id=int(os.environ["SKYPILOT_NODE_RANK"]),
        )
    if _on_cloud_tpu_vm():
        return "tpu", {}
    return "none", {}


def _on_cloud_tpu_vm() -> bool:
    """A Google TPU on the PCI bus (vendor 0x1ae0) and libtpu installed, read without starting any backend."""
    import glob
    import importlib.util

    google = False
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                google = google or f.read().strip() == "0x1ae0"
        except OSError:
            continue
    return google and importlib.util.find_spec("libtpu") is not None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """Join the other processes of a multi-host run; return ``(process_index, process_count)``.

    Calls ``jax.distributed.initialize`` with explicit arguments when given, else as ``cluster_environment``
    says (under ``srun``, on a multi-node SkyPilot task, on a Cloud TPU VM); a plain run of one process is left
    alone. Call it before anything else touches jax devices.
    """
    if not jax.distributed.is_initialized():
        if any(value is not None for value in (coordinator_address, num_processes, process_id)):
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        else:
            kind, arguments = cluster_environment()
            if kind != "none":
                jax.distributed.initialize(**arguments)
    return jax.process_index(), jax.process_count()


def host_local_to_global(batch: Any, mesh: Mesh, rules: str | Rules | None = None) -> Any:
    """This process's rows of a batch (pytree of [local_batch, ...] arrays) -> global ``jax.Array``s sharded
    by ``batch_sharding``; the global batch is the rows of all processes, in process order."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
