"""Ahead-of-time TPU plans: topology names (pure Python) and a real compile for v5e:2x2 when libtpu is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from t5x_lite import aot, config_files, partitioning, tpu_topology, train
from tests import tiny_config
from tests.conftest import REPO_ROOT, cpu_subprocess_env

LIBTPU_MISSING = "libtpu is not installed: `pip install '.[tpu]'` (jax[tpu]) to run the TPU ahead-of-time compile tests"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=LIBTPU_MISSING)

# --------------------------------------------------------------------------------------------------------------
# Topology names.
# --------------------------------------------------------------------------------------------------------------


def test_v4_and_v5p_names_count_tensorcores():
    topo = tpu_topology.parse_topology("v4-256")
    assert (topo.generation, topo.chips, topo.topology, topo.chip_config_name) == ("v4", 128, "v4:4x4x8", "megacore")
    assert topo.wrap == (True, True, True) and topo.hbm_bytes == 32 * tpu_topology.GiB
    small = tpu_topology.parse_topology("v5p-8")
    assert (small.chips, small.topology, small.chip_config_name, small.wrap) == (
        4,
        "v5p:2x2x1",
        "megacore",
        (False, False, False),
    )
    assert tpu_topology.parse_topology("v4-8").topology == "v4:2x2x1"
    assert tpu_topology.parse_topology("v4-128").chips == 64
    assert tpu_topology.parse_topology("v5p-256").hbm_bytes == 95 * tpu_topology.GiB


def test_v5e_names_count_chips():
    topo = tpu_topology.parse_topology("v5e-256")
    assert (topo.chips, topo.topology, topo.chip_config_name, topo.wrap) == (
        256,
        "v5e:16x16",
        "default",
        (True, True, False),
    )
    assert tpu_topology.parse_topology("v5e-8").topology == "v5e:2x4"
    assert tpu_topology.parse_topology("v5litepod-16").topology == "v5e:4x4"
    assert tpu_topology.parse_topology("v5e-128").wrap == (False, True, False)
    assert tpu_topology.parse_topology("v5e-256").hbm_bytes == 16 * tpu_topology.GiB


def test_libtpu_form_and_slices():
    topo = tpu_topology.parse_topology("v5e:2x2")
    assert (topo.chips, topo.topology, topo.num_slices, topo.num_devices) == (4, "v5e:2x2", 1, 4)
    assert tpu_topology.parse_topology("v5:4x4x8").topology == "v5p:4x4x8"  # libtpu's older name of v5p
    two = tpu_topology.parse_topology("2xv5e-256")
    assert (two.chips, two.num_slices, two.num_devices) == (256, 2, 512)
    assert tpu_topology.parse_topology("v5p-256", num_slices=4).num_devices == 512
    assert tpu_topology.parse_topology("2xv5p-256", num_slices=2).num_slices == 2
    with pytest.raises(ValueError, match="says 2 slices but --num_slices=3"):
        tpu_topology.parse_topology("2xv5p-256", num_slices=3)


@pytest.mark.parametrize("name", ["v3-8", "v4-7", "v4-6", "v5e-512", "v5e-12", "tpu", "v4:4x4", "v5e:16x16x1", "v5e-x"])
def test_bad_names_name_the_accepted_forms(name):
    with pytest.raises(ValueError, match=r"unknown TPU topology .*accepted forms: v4-N and v5p-N"):
        tpu_topology.parse_topology(name)


def test_missing_libtpu_is_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"libtpu is not installed.*pip install '\.\[tpu\]'"):
        tpu_topology.topology_devices(tpu_topology.parse_topology("v5e-4"))


def test_out_of_memory_messages_are_parsed():
    new = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.02G) "
        "exceeds available HBM (15.75G)."
    )
    old = (  # the wording of older libtpu releases
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 40.5G of 15.75G hbm. Exceeded hbm capacity by 24.75G."
    )
    assert aot._out_of_memory(RuntimeError(new)) == (int(20.02 * tpu_topology.GiB), int(15.75 * tpu_topology.GiB))
    assert aot._out_of_memory(RuntimeError(old)) == (int(40.5 * tpu_topology.GiB), int(15.75 * tpu_topology.GiB))
    assert aot._out_of_memory(RuntimeError("INVALID_ARGUMENT: something else")) is None


def test_fixes_keep_the_global_batch():
    config = tiny_config.get_config("batch_size=32")  # data_parallel, mesh (-1, 1, 1)
    found = aot.fixes(config, tpu_topology.parse_topology("v5e-4"))
    assert [fix.description.split(" ")[0] for fix in found] == [
        "remat_policy='full'",
        "partitioning='fsdp',",
        "num_microbatches=2",
        "num_microbatches=4",
        "num_microbatches=8",
    ]
    last = found[-1].changes
    assert last["partitioning"] == "fsdp" and last["mesh_shape"] == (1, -1, 1) and last["num_microbatches"] == 8
    assert "--config.mesh_shape='(1,-1,1)'" in aot.fix_flags(found[1])


def test_cli_rejects_an_unknown_topology_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "t5x_lite.aot", "--config", "tests/tiny_config.py", "--topology", "v9-8"],
        cwd=REPO_ROOT,
        env=cpu_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "error: unknown TPU topology 'v9-8'" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Real ahead-of-time compiles (libtpu).
# --------------------------------------------------------------------------------------------------------------


@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_2x2():
    config = tiny_config.get_config("batch_size=8")
    config.partitioning, config.mesh_shape = "fsdp_tp", (1, 2, 2)
    plan = aot.plan(config, "v5e:2x2")
    assert plan.topology.num_devices == 4 and plan.mesh == {"data": 1, "fsdp": 2, "model": 2}
    assert plan.fits and plan.error is None
    assert plan.argument_bytes > 0 and plan.state_bytes > 0 and plan.temp_bytes >= 0
    assert plan.total_bytes == (
        plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes + plan.generated_code_bytes
    )
    assert plan.xla_flops > 0 and plan.model_flops > 0
    assert plan.alias_bytes > 0  # the donated train state is reused for the new one
    text = aot.format_plan(plan)
    assert "FITS" in text and "v5e:2x2" in text and "data=1 fsdp=2 model=2" in text


@needs_libtpu
def test_a_plan_that_does_not_fit_says_so_with_how_much_over():
    config = tiny_config.get_config("batch_size=1024")
    # A 2M-row vocabulary: the logits alone are 256 rows x 32 x 2M x 4 bytes = 64 GiB per chip.
    config.model_overrides.vocab_size = 2**21
    plan = aot.plan(config, "v5e-4")
    assert not plan.fits and plan.over_bytes > 0 and plan.total_bytes > 16 * tpu_topology.GiB
    assert plan.xla_hbm_bytes and plan.xla_hbm_bytes <= 16 * tpu_topology.GiB
    assert plan.argument_bytes is None and plan.state_bytes > 0
    assert "DOES NOT FIT" in aot.format_plan(plan)


@needs_libtpu
def test_slices_join_along_data():
    devices = tpu_topology.topology_devices(tpu_topology.parse_topology("2xv5e-4"))
    assert len(devices) == 8
    mesh = partitioning.make_mesh((1, -1, 1), devices)  # no data axis: it takes the slices from fsdp
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    for row in range(2):  # each data-parallel replica lives in one slice; fsdp never crosses the network
        assert len({device.slice_index for device in mesh.devices[row].flat}) == 1
    assert dict(partitioning.make_mesh((1, 4, 2), devices).shape) == {"data": 2, "fsdp": 2, "model": 2}
    with pytest.raises(ValueError, match=r"the data axis \(1\) must be a multiple of the number of slices"):
        partitioning.make_mesh((1, 1, 8), devices)


def test_model_config_sizes_the_vocabulary_as_the_train_command_does():
    """Without data, the plan's embedding rows are the train command's: the pieces (``config.vocab_size`` or the
    task's) plus the task's sentinels (none for Multi30k's tok/ task, 100 for T5's), padded to 128."""
    config = config_files.load_config(f"{REPO_ROOT}/configs/multi30k.py")
    assert aot.model_config(config).vocab_size == train.model_config(config, 8000).vocab_size == 8064
    config.vocab_size = 10000
    assert aot.model_config(config).vocab_size == train.model_config(config, 10000).vocab_size == 10112
    demo = tiny_config.get_config()  # synthetic_numbers: 256 pieces + 100 sentinels
    assert aot.model_config(demo).vocab_size == train.model_config(demo, 356).vocab_size == 384
    config.quantization = "int8"  # the plan compiles the quantization-aware model the train command trains
    assert aot.model_config(config).qat == train.model_config(config, 10000).qat == "int8"


def test_model_overrides_vocab_size_sets_the_rows_and_may_not_drop_ids():
    """``model_overrides.vocab_size`` sets the embedding rows (more than the vocabulary's ids: a padded table, as
    T5's 32,128); fewer rows than ids is refused with what to do, not a shape error later."""
    config = tiny_config.get_config()
    config.model_overrides.vocab_size = 1024
    assert aot.model_config(config).vocab_size == train.model_config(config, 356).vocab_size == 1024
    config.model_overrides.vocab_size = 300
    with pytest.raises(ValueError, match=r"model_overrides.vocab_size=300 gives fewer embedding rows than .* 356 ids"):
        train.model_config(config, 356)
