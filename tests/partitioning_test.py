"""Meshes, rule presets, sharded initialization and forward pass, validation errors, multi-process batches.

The device count is fixed when jax starts, and this session's jax is already running on one CPU device, so
the multi-device checks run in subprocesses: ``_eight_device_report`` under 8 forced CPU devices (one
process, every sharded computation on a tiny model), ``_two_process_worker`` as 2 processes x 1 device
joined over gloo on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from t5x_lite import network, partitioning
from tests.conftest import REPO_ROOT, cpu_subprocess_env

ROOT = REPO_ROOT
# scan_layers: one compiled layer per stack (init compiles in ~9 s instead of ~20 s), and the 'layers' axis.
TINY = dict(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    scan_layers=True,
)
QUERY = ("encoder", "layers", "attention", "query", "kernel")
EMBEDDING = ("token_embedder", "embedding")
WI = ("decoder", "layers", "mlp", "wi", "kernel")
WO = ("decoder", "layers", "mlp", "wo", "kernel")
RELPOS = ("encoder", "relpos_bias", "rel_embedding")
NORM = ("encoder", "encoder_norm", "scale")


def _spec_json(spec: P) -> list:
    return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


def _python(code: str, devices: int | None) -> subprocess.Popen:
    """Start ``python -c code`` in the repository root on CPU, with ``devices`` forced host devices."""
    env = cpu_subprocess_env(devices)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _report(process: subprocess.Popen, timeout: float = 240) -> dict:
    """The JSON object on the last stdout line of ``process``; fails with its stderr when it fails."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"subprocess timed out after {timeout} s; stderr tail:\n{err[-3000:]}")
    if process.returncode != 0:
        pytest.fail(f"subprocess exited with {process.returncode}; stderr tail:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------
# In this process: rules, validation, single-process distributed init (no devices needed beyond one).
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def specs():
    """Mesh PartitionSpecs of every parameter of the tiny (scanned) model, per preset, flattened by path."""
    logical = network.param_logical_axes(network.TransformerConfig(**TINY))
    return {
        name: traverse_util.flatten_dict(partitioning.logical_to_mesh_specs(logical, name))
        for name in partitioning.RULES
    }


def test_data_parallel_replicates_parameters(specs):
    assert all(all(axis is None for axis in spec) for spec in specs["data_parallel"].values())


def test_fsdp_shards_the_embed_dimension_over_fsdp(specs):
    fsdp = specs["fsdp"]
    assert fsdp[QUERY] == P(None, "fsdp", None, None)  # [layers, embed, heads, kv]
    assert fsdp[WO] == P(None, None, "fsdp")  # [layers, mlp, embed]
    assert fsdp[EMBEDDING] == P(None, "fsdp")  # [vocab, embed]
    assert fsdp[NORM] == P("fsdp")
    assert fsdp[RELPOS] == P(None, None)


def test_fsdp_tp_adds_heads_mlp_vocab_on_model(specs):
    fsdp_tp = specs["fsdp_tp"]
    assert fsdp_tp[QUERY] == P(None, "fsdp", "model", None)
    assert fsdp_tp[WI] == P(None, "fsdp", "model")
    assert fsdp_tp[WO] == P(None, "model", "fsdp")
    assert fsdp_tp[EMBEDDING] == P("model", "fsdp")
    assert fsdp_tp[RELPOS] == P("model", None)


def test_unscanned_query_kernel_under_fsdp_tp():
    logical = network.param_logical_axes(network.TransformerConfig(**dict(TINY, scan_layers=False)))
    query = logical["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert partitioning.logical_to_mesh_specs(query, "fsdp_tp") == P("fsdp", "model", None)


def test_activations_batch_takes_fsdp_before_embed():
    # Rules in order of precedence: the batch takes ('data', 'fsdp'), so 'embed' in an activation stays whole.
    for name in partitioning.RULES:
        spec = partitioning.logical_to_mesh_specs(P("batch", "length", "embed"), name)
        assert spec == P(("data", "fsdp"), None, None)
    spec = partitioning.logical_to_mesh_specs(P("batch", "length", "heads", "kv"), "fsdp_tp")
    assert spec == P(("data", "fsdp"), None, "model", None)
    assert partitioning.logical_to_mesh_specs(P("batch", "length", "vocab"), "fsdp_tp")[2] == "model"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"partitioning='tp'.*data_parallel, fsdp, fsdp_tp"):
        partitioning.get_rules("tp")


def _mesh(data: int, fsdp: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, model), partitioning.MESH_AXES)


def test_validate_accepts_divisible_shapes():
    cfg = network.TransformerConfig(**TINY)
    for name in partitioning.RULES:
        partitioning.validate(cfg, _mesh(4, 1, 2), 8, name)
        partitioning.validate(cfg, _mesh(1, 8, 1), 8, name)


@pytest.mark.parametrize(
    "overrides, mesh, batch, rules, message",
    [
        ({}, (4, 1, 2), 6, "data_parallel", r"^batch_size=6 is not divisible by data=4 \* fsdp=1 = 4.*multiple of 4"),
        ({}, (2, 4, 1), 12, "fsdp", r"^batch_size=12 is not divisible by data=2 \* fsdp=4 = 8"),
        ({"num_heads": 3, "d_kv": 4}, (4, 1, 2), 8, "fsdp_tp", r"^num_heads=3 is not divisible by model=2"),
        ({"d_ff": 31}, (4, 1, 2), 8, "fsdp_tp", r"^d_ff=31 is not divisible by model=2.*multiple of 2"),
        ({"vocab_size": 63}, (4, 1, 2), 8, "fsdp_tp", r"^vocab_size=63 is not divisible by model=2"),
        ({"d_model": 12, "num_heads": 2}, (1, 8, 1), 8, "fsdp", r"^d_model=12 is not divisible by fsdp=8"),
    ],
)
def test_validate_errors_name_the_value_and_the_fix(overrides, mesh, batch, rules, message):
    cfg = network.TransformerConfig(**dict(TINY, **overrides))
    with pytest.raises(ValueError, match=message) as error:
        partitioning.validate(cfg, _mesh(*mesh), batch, rules)
    assert "\n" not in str(error.value)
    assert "use a" in str(error.value)


def test_validate_ignores_dimensions_the_rules_leave_whole():
    cfg = network.TransformerConfig(**dict(TINY, num_heads=3, d_kv=4, d_ff=31, vocab_size=63))
    partitioning.validate(cfg, _mesh(4, 1, 2), 8, "fsdp")  # heads, mlp, vocab are not on 'model' under fsdp


def test_maybe_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in ("SLURM_NTASKS", "SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert partitioning.cluster_environment() == ("none", {})
    assert partitioning.maybe_initialize_distributed() == (0, 1)
    assert not jax.distributed.is_initialized()
    # SkyPilot on one node: nothing to join.
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "10.0.0.5\n")
    monkeypatch.setenv("SKYPILOT_NODE_RANK", "0")
    assert partitioning.cluster_environment() == ("none", {})
    # An sbatch allocation of 4 tasks, but this python not started by srun: still one process.
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    assert partitioning.maybe_initialize_distributed() == (0, 1)


def test_make_mesh_rejects_bad_shapes_on_one_device():
    with pytest.raises(ValueError, match=r"mesh_shape=\(2, 1, 1\) needs 2 devices but there are 1"):
        partitioning.make_mesh((2, 1, 1))
    with pytest.raises(ValueError, match=r"mesh_shape=\(-1, -1, 1\) is invalid"):
        partitioning.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match=r"mesh_shape=\(-1, 1\) is invalid"):
        partitioning.make_mesh((-1, 1))
    assert dict(partitioning.make_mesh().shape) == {"data": 1, "fsdp": 1, "model": 1}


# --------------------------------------------------------------------------------------------------------------
# 8 forced CPU devices, in a subprocess.
# --------------------------------------------------------------------------------------------------------------


def _eight_device_report() -> None:
    """Runs in a subprocess with 8 CPU devices; prints one JSON line of results for the tests below."""
    assert jax.device_count() == 8, jax.devices()
    report: dict = {"meshes": {}, "mesh_errors": [], "shardings": {}}
    for shape in [(4, 1, 2), (1, 8, 1), (-1, 1, 1), (2, -1, 2)]:
        mesh = partitioning.make_mesh(shape)
        report["meshes"][str(shape)] = {
            "shape": dict(mesh.shape),
            "auto": all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types),
            "devices": sorted(d.id for d in mesh.devices.flat),
        }
    for shape in [(3, 1, 1), (-1, 3, 1), (4, 1, 4)]:
        try:
            partitioning.make_mesh(shape)
            report["mesh_errors"].append(None)
        except ValueError as error:
            report["mesh_errors"].append(str(error))

    cfg = network.TransformerConfig(**TINY)
    mesh = partitioning.make_mesh((2, 2, 2))
    for name in partitioning.RULES:
        shardings = traverse_util.flatten_dict(partitioning.param_shardings(cfg, mesh, name))
        assert all(s.mesh == mesh for s in shardings.values())
        report["shardings"][name] = {"/".join(k): _spec_json(s.spec) for k, s in shardings.items()}

    # Initialized in shards on (data=4, model=2) under fsdp_tp; the same values as the 1-device init.
    mesh = partitioning.make_mesh((4, 1, 2))
    shardings = partitioning.param_shardings(cfg, mesh, "fsdp_tp")
    params = partitioning.init_params_sharded(cfg, jax.random.key(0), mesh, "fsdp_tp")
    reference = network.init_params(cfg, jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    flat_shardings = traverse_util.flatten_dict(shardings)
    flat_reference = traverse_util.flatten_dict(reference)
    report["init_sharding_matches"] = all(
        flat[k].sharding.is_equivalent_to(flat_shardings[k], flat[k].ndim) for k in flat
    )
    report["init_equal"] = all(np.array_equal(np.asarray(flat[k]), np.asarray(flat_reference[k])) for k in flat)
    query = flat[QUERY]
    report["query_shard_shape"] = list(query.addressable_shards[0].data.shape)
    report["query_shape"] = list(query.shape)

    # Forward pass: 1 device vs (data=4, model=2) under fsdp_tp and fsdp=8 under fsdp.
    model = network.Transformer(cfg)
    rng = np.random.default_rng(0)
    encoder_tokens = rng.integers(1, cfg.vocab_size, (8, 8)).astype(np.int32)
    decoder_tokens = rng.integers(1, cfg.vocab_size, (8, 6)).astype(np.int32)
    encoder_tokens[:, -2:] = 0  # some padding

    def forward(params, encoder_tokens, decoder_tokens):
        return model.apply({"params": params}, encoder_tokens, decoder_tokens)

    single = np.asarray(jax.jit(forward)(reference, encoder_tokens, decoder_tokens))
    report["forward"] = {}
    for shape, name in [((4, 1, 2), "fsdp_tp"), ((1, 8, 1), "fsdp")]:
        mesh = partitioning.make_mesh(shape)
        shardings = partitioning.param_shardings(cfg, mesh, name)
        batch = partitioning.batch_sharding(mesh)
        with partitioning.activate(mesh, name):
            sharded = jax.jit(forward, in_shardings=(shardings, batch, batch))
            logits = sharded(jax.device_put(params, shardings), encoder_tokens, decoder_tokens)
        report["forward"][name] = {
            "max_abs_delta": float(np.abs(np.asarray(logits) - single).max()),
            "logits_spec": _spec_json(logits.sharding.spec),
        }
    print(json.dumps(report))


@pytest.fixture(scope="module")
def eight():
    code = "from tests.partitioning_test import _eight_device_report; _eight_device_report()"
    return _report(_python(code, devices=8))


def test_make_mesh_shapes_on_eight_devices(eight):
    meshes = eight["meshes"]
    assert meshes["(4, 1, 2)"]["shape"] == {"data": 4, "fsdp": 1, "model": 2}
    assert meshes["(1, 8, 1)"]["shape"] == {"data": 1, "fsdp": 8, "model": 1}
    assert meshes["(-1, 1, 1)"]["shape"] == {"data": 8, "fsdp": 1, "model": 1}
    assert meshes["(2, -1, 2)"]["shape"] == {"data": 2, "fsdp": 2, "model": 2}
    for mesh in meshes.values():
        assert mesh["auto"] and mesh["devices"] == list(range(8))


def test_make_mesh_errors_on_eight_devices(eight):
    needs, fills, too_many = eight["mesh_errors"]
    assert needs.startswith("mesh_shape=(3, 1, 1) needs 3 devices but there are 8")
    assert fills.startswith("mesh_shape=(-1, 3, 1) cannot fill 8 devices: 3 does not divide 8")
    assert too_many.startswith("mesh_shape=(4, 1, 4) needs 16 devices but there are 8")


def test_param_shardings_follow_the_presets(eight, specs):
    for name, shardings in eight["shardings"].items():
        assert shardings == {"/".join(k): _spec_json(s) for k, s in specs[name].items()}
    assert eight["shardings"]["fsdp_tp"]["/".join(QUERY)] == [None, "fsdp", "model", None]


def test_init_params_sharded_matches_shardings_and_values(eight):
    assert eight["init_sharding_matches"]
    assert eight["init_equal"]
    layers, embed, heads, kv = eight["query_shape"]
    assert eight["query_shard_shape"] == [layers, embed, heads // 2, kv]  # fsdp=1, model=2


def test_sharded_forward_equals_one_device(eight):
    for name, result in eight["forward"].items():
        assert result["max_abs_delta"] < 1e-5, (name, result)
    assert eight["forward"]["fsdp_tp"]["logits_spec"][0] == "data"
    assert eight["forward"]["fsdp_tp"]["logits_spec"][2] == "model"
    assert eight["forward"]["fsdp"]["logits_spec"][0] == "fsdp"


# --------------------------------------------------------------------------------------------------------------
# 2 processes x 1 CPU device on 127.0.0.1 (gloo).
# --------------------------------------------------------------------------------------------------------------


def _two_process_worker(process_id: int, port: int) -> None:
    """One of two processes: 3 local rows each -> a global [6, 4] batch; prints one JSON line."""
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    index, count = partitioning.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mesh = partitioning.make_mesh((-1, 1, 1))
    local = np.arange(12, dtype=np.int32).reshape(3, 4) + 100 * process_id
    batch = partitioning.host_local_to_global({"inputs": local}, mesh)
    total = jax.jit(lambda b: jnp.sum(b["inputs"]))(batch)
    rows = multihost_utils.process_allgather(batch["inputs"], tiled=True)
    report = {
        "index": index,
        "count": count,
        "mesh": dict(mesh.shape),
        "global_shape": list(batch["inputs"].shape),
        "local_shape": list(local.shape),
        "sum": int(total),
        "rows": np.asarray(rows).tolist(),
    }
    print(json.dumps(report), flush=True)


def test_cluster_environment_reads_skypilot_and_slurm_variables(monkeypatch):
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "10.0.0.5\n10.0.0.6\n10.0.0.7")
    monkeypatch.setenv("SKYPILOT_NODE_RANK", "2")
    monkeypatch.setenv("T5X_LITE_COORDINATOR_PORT", "9999")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    kind, arguments = partitioning.cluster_environment()
    assert kind == "skypilot"
    assert arguments == dict(coordinator_address="10.0.0.5:9999", num_processes=3, process_id=2)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-002]")
    assert partitioning.cluster_environment() == ("slurm", {})  # srun's variables win: jax reads them itself
    monkeypatch.setenv("T5X_LITE_DISTRIBUTED", "0")
    assert partitioning.cluster_environment() == ("none", {})


def _env_worker() -> None:
    """A process that joins its peers only from its launcher's environment variables; prints one JSON line."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kind, _ = partitioning.cluster_environment()
    index, count = partitioning.maybe_initialize_distributed()
    total = jax.jit(lambda x: jnp.sum(x))(
        partitioning.host_local_to_global(np.full((2, 1), index + 1, np.int32), partitioning.make_mesh((-1, 1, 1)))
    )
    print(json.dumps({"kind": kind, "index": index, "count": count, "sum": int(total)}), flush=True)


def _run_env_workers(envs: list[dict[str, str]]) -> list[dict]:
    code = "from tests.partitioning_test import _env_worker; _env_worker()"
    processes = []
    for extra in envs:
        env = cpu_subprocess_env(**extra)
        for name in ("SLURM_NTASKS", "SLURM_STEP_NODELIST", "SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK"):
            if name not in extra:
                env.pop(name, None)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        return [_report(p, timeout=180) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_two_processes_join_from_skypilot_variables():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {
        "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
        "SKYPILOT_NUM_NODES": "2",
        "T5X_LITE_COORDINATOR_PORT": str(port),
    }
    reports = _run_env_workers([dict(common, SKYPILOT_NODE_RANK=str(i)) for i in range(2)])
    for i, report in enumerate(reports):
        assert report == {"kind": "skypilot", "index": i, "count": 2, "sum": 2 * 1 + 2 * 2}


def test_two_processes_join_from_slurm_variables():
    # jax's SLURM support puts the coordinator on the first node at port 61440 + SLURM_JOB_ID % 4096.
    for job_id in range(100, 4096, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id))
                break
            except OSError:
                continue
    common = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2"}
    reports = _run_env_workers([dict(common, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)) for i in range(2)])
    for i, report in enumerate(reports):
        assert report == {"kind": "slurm", "index": i, "count": 2, "sum": 2 * 1 + 2 * 2}


def test_two_processes_build_one_global_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "from tests.partitioning_test import _two_process_worker; _two_process_worker({}, {})"
    processes = [_python(code.format(i, port), devices=None) for i in range(2)]
    try:
        reports = [_report(p, timeout=180) for p in processes]
    finally:
        for p in processes:  # a failed peer leaves the other waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.communicate()
    expected_rows = np.concatenate([np.arange(12).reshape(3, 4) + 100 * i for i in range(2)])
    for i, report in enumerate(reports):
        assert (report["index"], report["count"]) == (i, 2)
        assert report["mesh"] == {"data": 2, "fsdp": 1, "model": 1}
        assert report["global_shape"] == [6, 4] and report["local_shape"] == [3, 4]
        assert report["rows"] == expected_rows.tolist()  # process 0's rows first
        assert report["sum"] == int(expected_rows.sum())
