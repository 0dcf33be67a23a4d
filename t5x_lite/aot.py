"""Ahead-of-time compile of a config's train step for a TPU topology you don't have: memory per chip and FLOPs.

    python -m t5x_lite.aot --config configs/c4_span_corruption.py:size=xxl --topology v5p-256
    python -m t5x_lite.aot --config configs/c4_span_corruption.py:size=xl --topology 2xv5e-256 \\
        --config.model_overrides.remat_policy=full --config.batch_size=1024

The real ``trainer.compile_train_step`` of the config (model, optimizer, schedule, microbatches, mesh and rules) is
lowered from ``jax.ShapeDtypeStruct``s only (nothing of the model's size is allocated, so T5-XXL plans on a laptop)
and compiled by libtpu for compile-only devices of the named topology (``jax.experimental.topologies``). Prints
``compiled.memory_analysis()`` per chip against the chip's HBM, ``compiled.cost_analysis()`` FLOPs next to
``flops.train_flops``; a plan that does not fit says DOES NOT FIT, by how much, and compiles fixes (full remat, FSDP
over every chip, more microbatches) until one fits (``--try_fixes``). Needs libtpu: ``pip install '.[tpu]'``; no
TPU. See docs/scaling.md ("Ahead-of-time plans for TPU pods").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
import time
from typing import Any

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from t5x_lite import config_files, flops, network, optimizers, partitioning, tpu_topology, trainer  # noqa: E402
from t5x_lite.presets import get_model_config  # noqa: E402
from t5x_lite.tpu_topology import GiB, Topology, parse_topology, quiet_stderr, topology_devices  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What one ahead-of-time compile says about a config on a topology. Bytes are per chip."""

    topology: Topology
    model: str
    params: int
    batch_size: int
    num_microbatches: int
    input_length: int
    target_length: int
    pack: bool
    remat_policy: str
    partitioning: str
    mesh: dict[str, int]
    state_bytes: int  # the train state's shards on one chip (parameters + optimizer state), from the shardings
    batch_bytes: int
    hbm_bytes: int
    model_flops: float  # flops.train_flops: the whole step, all chips
    compile_seconds: float
    fits: bool
    total_bytes: int  # needed on one chip: memory_analysis, or XLA's figure in its out-of-memory error
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    peak_bytes: int | None = None
    xla_flops: float | None = None  # cost_analysis: one chip
    error: str | None = None  # XLA's out-of-memory message
    xla_hbm_bytes: int | None = None  # the HBM XLA can use on one chip, from that message (a little under the HBM)
    scan_layers: bool = False

    @property
    def over_bytes(self) -> int:
        return max(0, self.total_bytes - self.hbm_bytes)

    @property
    def per_chip_rows(self) -> float:
        return self.batch_size / self.num_microbatches / (self.mesh["data"] * self.mesh["fsdp"])

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["topology"] = dataclasses.asdict(self.topology)
        out["over_bytes"] = self.over_bytes
        return out


def model_config(config: Any) -> network.TransformerConfig:
    """The run's TransformerConfig without reading data: what the train command builds, for the vocabulary's
    size it will have (``config.vocab_size`` or the task's SentencePiece pieces, plus the task's sentinels;
    a given SentencePiece model: the preset's vocabulary)."""
    from t5x_lite.data.tasks import TaskRegistry

    task = TaskRegistry.get(config.task)
    first = task.tasks()[0] if hasattr(task, "tasks") else task
    if first.vocab_path:  # a given SentencePiece model: its size is that of the preset's vocabulary
        ids = get_model_config(config.model).vocab_size
    else:
        ids = (config.get("vocab_size", 0) or first.vocab_size) + first.extra_ids
    return config_files.model_config(config, ids)


def task_lengths(config: Any) -> tuple[int, int]:
    from t5x_lite.data.tasks import TaskRegistry

    task = TaskRegistry.get(config.task)
    lengths = task.tasks()[0].lengths if hasattr(task, "tasks") else task.lengths
    return int(lengths["inputs"]), int(lengths["targets"])


def _bytes_on_one_device(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def abstract_inputs(config: Any, model_cfg: network.TransformerConfig, optimizer: Any, mesh: Mesh) -> tuple:
    """(state, batch, rng) as sharded ``jax.ShapeDtypeStruct``s: the train step's arguments, never allocated."""
    rules = config.partitioning
    abstract_state = jax.eval_shape(
        lambda key: trainer.create_train_state(model_cfg, optimizer, key),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
    )
    shardings = trainer.state_shardings(model_cfg, optimizer, mesh, rules)
    state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
    input_length, target_length = task_lengths(config)
    rows = partitioning.batch_sharding(mesh, rules)

    def feature(length: int, dtype: Any = jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((config.batch_size, length), dtype, sharding=rows)

    batch = {
        "encoder_input_tokens": feature(input_length),
        "decoder_input_tokens": feature(target_length),
        "decoder_target_tokens": feature(target_length),
        "decoder_loss_weights": feature(target_length, jnp.float32),
    }
    if config.pack:
        batch.update(
            encoder_segment_ids=feature(input_length),
            decoder_segment_ids=feature(target_length),
            encoder_positions=feature(input_length),
            decoder_positions=feature(target_length),
        )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    return state, batch, rng


_OOM_PATTERNS = (
    # "Ran out of memory on HBM, the total memory required for HLO temporaries (20.02G) exceeds available HBM (15.75G)."
    re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    # "Ran out of memory in memory space hbm. Used 40.53G of 15.75G hbm. Exceeded hbm capacity by 24.78G."
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory(error: Exception) -> tuple[int, int] | None:
    """(bytes needed, bytes available) of XLA:TPU's out-of-memory compile error, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    for pattern in _OOM_PATTERNS:
        match = pattern.search(text)
        if match:
            need = float(match.group(1)) * _UNITS[match.group(2)]
            have = float(match.group(3)) * _UNITS[match.group(4)]
            return int(need), int(have)
    return None


def _cost_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def plan(config: Any, topology: str | Topology, num_slices: int | None = None) -> Plan:
    """Compile ``config``'s train step for ``topology`` ahead of time and measure it (see the module docstring).

    Raises ValueError for a config that cannot be laid out (the message names the value and the fix) and
    RuntimeError when libtpu is missing or cannot describe the topology.
    """
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    devices = topology_devices(topo)
    model_cfg = model_config(config)
    rules = config.partitioning
    mesh = partitioning.make_mesh(tuple(config.mesh_shape), devices)  # as train.py; slices join along data
    partitioning.validate(model_cfg, mesh, config.batch_size, rules)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.num_microbatches
    if config.batch_size % micro or (config.batch_size // micro) % rows:
        raise ValueError(
            f"num_microbatches={micro}: each microbatch of batch_size={config.batch_size} must split evenly over "
            f"data * fsdp = {rows} chips; use a num_microbatches dividing {config.batch_size // rows}"
        )
    optimizer = optimizers.make_optimizer(config, logical_axes=network.param_logical_axes(model_cfg))
    state, batch, rng = abstract_inputs(config, model_cfg, optimizer, mesh)
    step = trainer.compile_train_step(
        model_cfg,
        optimizer,
        mesh,
        rules,
        num_microbatches=micro,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
        schedule=optimizers.make_schedule(config),
        skip_nonfinite=config.get("skip_nonfinite_updates", False),
    )
    input_length, target_length = task_lengths(config)
    common = dict(
        topology=topo,
        model=config.model,
        params=network.count_params(model_cfg),
        batch_size=config.batch_size,
        num_microbatches=micro,
        input_length=input_length,
        target_length=target_length,
        pack=bool(config.pack),
        remat_policy=model_cfg.remat_policy,
        partitioning=rules if isinstance(rules, str) else "custom",
        mesh=dict(mesh.shape),
        state_bytes=_bytes_on_one_device(state),
        batch_bytes=_bytes_on_one_device(batch),
        hbm_bytes=topo.hbm_bytes,
        model_flops=flops.train_flops(model_cfg, config.batch_size, input_length, target_length),
        scan_layers=model_cfg.scan_layers,
    )
    start = time.perf_counter()
    with partitioning.activate(mesh, rules):
        lowered = step.lower(state, batch, rng)
    try:
        with quiet_stderr():
            compiled = lowered.compile()
    except Exception as error:  # XLA:TPU refuses a program that does not fit in HBM
        oom = _out_of_memory(error)
        if oom is None:
            raise
        return Plan(
            **common,
            compile_seconds=time.perf_counter() - start,
            fits=False,
            total_bytes=oom[0],
            xla_hbm_bytes=oom[1],
            error=str(error).strip().splitlines()[0][:400],
        )
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp, code = memory.alias_size_in_bytes, memory.temp_size_in_bytes, memory.generated_code_size_in_bytes
    total = argument + output - alias + temp + code
    peak = getattr(memory, "peak_memory_in_bytes", None)
    return Plan(
        **common,
        compile_seconds=seconds,
        fits=total <= topo.hbm_bytes,
        total_bytes=int(total),
        argument_bytes=int(argument),
        output_bytes=int(output),
        alias_bytes=int(alias),
        temp_bytes=int(temp),
        generated_code_bytes=int(code),
        peak_bytes=int(peak) if peak else None,
        xla_flops=_cost_flops(compiled),
    )


# --------------------------------------------------------------------------------------------------------------
# Fixes for a plan that does not fit.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fix:
    """A change to the config (cumulative with the fixes before it) and the flags that make it."""

    description: str
    changes: dict[str, Any]  # dotted config keys -> values


def _apply(config: Any, changes: dict[str, Any]) -> Any:
    config = config.copy_and_resolve_references()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            target[leaf] = value
    return config


def fixes(config: Any, topology: Topology) -> list[Fix]:
    """Changes that lower memory per chip, in the order to try them, each on top of the ones before: full remat;
    FSDP over every chip of a slice; then twice the microbatches until one row per chip. The training recipe (the
    global batch) is unchanged by all of them."""
    out: list[Fix] = []
    changes: dict[str, Any] = {}
    model_cfg = model_config(config)
    if model_cfg.remat_policy != "full":
        changes["model_overrides.remat_policy"] = "full"
        out.append(Fix("remat_policy='full'", dict(changes)))
    shape = partitioning.resolve_mesh_shape(config.mesh_shape, topology.num_devices)
    rules = config.partitioning
    data_axis = topology.num_slices  # keep one data-parallel replica per slice
    if rules == "data_parallel" or shape[0] > data_axis:
        model = shape[2] if rules == "fsdp_tp" else 1
        new_rules = rules if rules in ("fsdp", "fsdp_tp") else "fsdp"
        new_shape = (data_axis, -1, model)
        changes.update({"partitioning": new_rules, "mesh_shape": new_shape})
        out.append(Fix(f"partitioning={new_rules!r}, mesh_shape={new_shape} (state over every chip)", dict(changes)))
        shape = partitioning.resolve_mesh_shape(new_shape, topology.num_devices)
    rows = shape[0] * shape[1]
    micro = config.num_microbatches
    while config.batch_size % (micro * 2) == 0 and (config.batch_size // (micro * 2)) % rows == 0:
        micro *= 2
        changes["num_microbatches"] = micro
        per_chip = config.batch_size // micro // rows
        out.append(Fix(f"num_microbatches={micro} ({_rows(per_chip)} per chip per microbatch)", dict(changes)))
    return out


def fix_flags(fix: Fix) -> str:
    """All the flags of a cumulative fix."""
    parts = []
    for key, value in fix.changes.items():
        text = f"'{tuple(value)}'".replace(" ", "") if isinstance(value, tuple) else str(value)
        parts.append(f"--config.{key}={text}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 100 else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _rows(n: float) -> str:
    return f"{n:g} row{'' if n == 1 else 's'}"


def format_plan(p: Plan) -> str:
    """The plan as the command prints it."""
    topo = p.topology
    mesh = " ".join(f"{axis}={size}" for axis, size in p.mesh.items())
    micro = f"{p.num_microbatches} microbatch{'es' if p.num_microbatches > 1 else ''}"
    lines = [
        f"topology     {topo.describe()}",
        f"model        {p.model}: {_count(p.params)} parameters, remat_policy={p.remat_policy!r}",
        f"batch        {p.batch_size} x ({p.input_length} -> {p.target_length}){' packed' if p.pack else ''}, "
        f"{micro}: {_rows(p.per_chip_rows)} per chip per microbatch",
        f"mesh         {mesh}, partitioning {p.partitioning!r}",
        f"compile      {p.compile_seconds:.1f} s (jax {jax.__version__}, libtpu {_libtpu_version()}, on this machine)",
        "memory per chip (compiled.memory_analysis())",
    ]

    def row(name: str, value: int | None, note: str = "", sign: str = "") -> str:
        return f"  {name:<15}{sign + _gib(value):>12}{'  ' + note if note else ''}".rstrip()

    if p.argument_bytes is not None:
        state = f"train state {_gib(p.state_bytes)}, batch {_gib(p.batch_bytes)}"
        lines += [
            row("arguments", p.argument_bytes, f"({state})"),
            row("outputs", p.output_bytes),
            row("aliased", p.alias_bytes, "(outputs written into the donated state's buffers)", sign="-"),
            row("temporaries", p.temp_bytes, "(activations, gradients, collectives' buffers)"),
            row("generated code", p.generated_code_bytes),
        ]
    else:
        lines.append(
            row("arguments", p.state_bytes + p.batch_bytes, f"(from the shardings: train state {_gib(p.state_bytes)})")
        )
    hbm = f"of {p.hbm_bytes / GiB:.0f} GiB HBM ({topo.generation})"
    if p.fits:
        verdict = f"FITS, {100 * p.total_bytes / p.hbm_bytes:.0f}% used, {_gib(p.hbm_bytes - p.total_bytes)} free"
    else:
        verdict = f"DOES NOT FIT: {_gib(p.over_bytes)} over"
        if p.xla_hbm_bytes:
            verdict += f" ({_gib(p.total_bytes - p.xla_hbm_bytes)} over the {_gib(p.xla_hbm_bytes)} XLA can use)"
    lines.append(row("total", p.total_bytes, f"{hbm}: {verdict}"))
    if p.peak_bytes:
        lines.append(row("XLA peak", p.peak_bytes))
    if p.error:
        lines.append(f"  XLA refused the program (no breakdown then): {p.error}")
    chips = topo.num_devices
    lines.append("FLOPs per step (all chips = per chip x " + str(chips) + ")")
    if p.xla_flops is not None:
        lines.append(f"  XLA cost_analysis  {p.xla_flops:.3e} per chip, {p.xla_flops * chips:.3e} all chips")
    lines.append(f"  model (flops.py)   {p.model_flops / chips:.3e} per chip, {p.model_flops:.3e} all chips")
    if p.xla_flops:
        loops = [what for what, on in (("scan_layers", p.scan_layers), ("microbatches", p.num_microbatches > 1)) if on]
        why = (
            f"XLA counts a loop body once, so with {' and '.join(loops)} its figure covers one layer / microbatch"
            if loops
            else "XLA also counts remat recomputation, elementwise work and the optimizer"
        )
        lines.append(f"  XLA / model        {p.xla_flops * chips / p.model_flops:.2f} ({why})")
    bound = p.model_flops / (chips * topo.peak_flops)
    lines.append(
        f"  model FLOPs at {topo.peak_flops / 1e12:.0f} TFLOP/s per chip (bf16 peak): {bound:.3f} s a step at 100% MFU"
    )
    return "\n".join(lines)


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return "unknown"


def run(config: Any, topology: Topology, try_fixes: int = 2, out=print) -> list[Plan]:
    """Plan ``config`` on ``topology``, print it, and when it does not fit try up to ``try_fixes`` fixes."""
    first = plan(config, topology)
    out(format_plan(first))
    plans = [first]
    if first.fits:
        return plans
    candidates = fixes(config, topology)
    out("")
    if not candidates:
        out("no fix within this topology keeps the batch: use a larger slice or more slices, or a smaller batch_size")
        return plans
    out(f"fixes, each on top of the ones before (compiling up to {try_fixes}; --try_fixes=N):")
    for index, fix in enumerate(candidates):
        if index >= try_fixes:
            rest = len(candidates) - index  # not compiled: the next one, and the last when there are more
            if index == try_fixes or index == len(candidates) - 1:
                out(f"  {index + 1}. {fix.description}: not compiled  [{fix_flags(fix)}]")
            elif index == try_fixes + 1 and rest > 1:
                out(f"  ... {rest - 1} more, twice the microbatches each time, down to:")
            continue
        fixed = plan(_apply(config, fix.changes), topology)
        plans.append(fixed)
        verdict = "FITS" if fixed.fits else f"DOES NOT FIT ({_gib(fixed.over_bytes)} over)"
        out(
            f"  {index + 1}. {fix.description}: {_gib(fixed.total_bytes)} per chip of {fixed.hbm_bytes / GiB:.0f} GiB, "
            f"{verdict} (compile {fixed.compile_seconds:.0f} s)  [{fix_flags(fix)}]"
        )
        if fixed.fits:
            break
    else:
        out(
            "  then: a larger slice or more slices (--topology 2x...; fewer rows per chip), or halve batch_size "
            "(changes the training recipe)"
        )
    return plans


# --------------------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    from absl import app, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None or not _TOPOLOGY.value:
        raise app.UsageError("pass --config configs/X.py and --topology NAME (e.g. v5e-256, v4-8, 2xv5p-256)")
    try:
        topology = parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
        print(f"ahead-of-time plan of {_config_name()} on {topology.name}", flush=True)
        plans = run(config, topology, try_fixes=_TRY_FIXES.value, out=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump([p.to_dict() for p in plans], f, indent=2)


def _config_name() -> str:
    for arg in sys.argv[1:]:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    if "--config" in sys.argv:
        index = sys.argv.index("--config")
        if index + 1 < len(sys.argv):
            return sys.argv[index + 1]
    return "the config"


def _define_flags() -> None:
    """Defined when run as a command only: importing the library must not claim absl's --config (train.py's)."""
    global _CONFIG, _TOPOLOGY, _NUM_SLICES, _TRY_FIXES, _JSON
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/demo.py.")
    _TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU topology to compile for; {tpu_topology.FORMS}.")
    _NUM_SLICES = flags.DEFINE_integer("num_slices", None, "Slices joined over the data-center network (default 1).")
    _TRY_FIXES = flags.DEFINE_integer("try_fixes", 2, "If the plan does not fit: how many fixes to compile.")
    _JSON = flags.DEFINE_string("json", None, "Also write the plans (numbers, bytes per chip) to this JSON file.")


def _cli() -> None:
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    _cli()
