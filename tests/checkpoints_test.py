"""Tests of t5x_lite/checkpoints.py: round trips, keep policy, crash safety, clear errors, resharding, preemption.

The resharding check needs 8 devices, fixed when jax starts, so it runs in a subprocess with
``--xla_force_host_platform_device_count=8`` (the pattern of partitioning_test.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import checkpoints, convert, network
from tests.conftest import REPO_ROOT, cpu_subprocess_env, random_params

ROOT = REPO_ROOT
TINY = network.TransformerConfig(
    vocab_size=32, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0
)


@flax.struct.dataclass
class TrainState:
    """Stand-in with the trainer's structure (step, params, opt_state): any pytree is checkpointable."""

    step: jax.Array
    params: dict
    opt_state: dict


def _state(step: int) -> dict:
    return {
        "step": jnp.int32(step),
        "params": {
            "w": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + step,
            "b": jnp.full((3,), step, jnp.bfloat16),
        },
        "opt_state": {"count": jnp.int32(step), "mu": {"w": jnp.ones((4, 3)) * 0.5}},
    }


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def _assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def tiny_params():
    return jax.tree.map(jnp.asarray, random_params(TINY))


def test_round_trip_is_bitwise_with_data_state_and_config(tmp_path, tiny_params):
    state = TrainState(
        step=jnp.int32(4), params=tiny_params, opt_state={"mu": jax.tree.map(jnp.zeros_like, tiny_params)}
    )
    data_state = {"next_index": 17, "parents": [{"epoch": 1}], "seed": 3}
    config = {"seed": 3, "model": {"d_model": 16}, "learning_rate": 0.01}
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=2, config=config)
    assert not ckpt.maybe_save(3, state, data_state)  # not a multiple of 2, not forced
    assert ckpt.maybe_save(4, state, data_state)
    ckpt.wait()
    restored, restored_data, restored_config = ckpt.restore(abstract_state=_abstract(state))
    ckpt.close()
    assert isinstance(restored, TrainState)
    _assert_bitwise_equal(restored, state)
    assert restored_data == data_state and restored_config == config
    # A fresh Checkpointer (a resumed run) sees the same; load_params reads the params subtree only.
    assert checkpoints.Checkpointer(tmp_path, save_every_steps=2).latest_step() == 4
    _assert_bitwise_equal(checkpoints.load_params(tmp_path), tiny_params)


def test_async_save_then_wait_and_latest_step(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=5, keep=10, async_save=True)
    assert ckpt.latest_step() is None
    for step in range(0, 21):
        ckpt.maybe_save(step, _state(step), {"i": step})
    assert ckpt.maybe_save(23, _state(23), {"i": 23}, force=True)  # e.g. the last step or a preemption
    assert not ckpt.maybe_save(23, _state(23), {"i": 23}, force=True)  # a step on disk is not rewritten
    ckpt.wait()
    assert ckpt.all_steps() == [0, 5, 10, 15, 20, 23]
    assert ckpt.latest_step() == 23
    state, data_state, _ = ckpt.restore(step=15, abstract_state=_abstract(_state(0)))
    _assert_bitwise_equal(state, _state(15))
    assert data_state == {"i": 15}
    ckpt.close()


def test_keeps_last_k_plus_best(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1, keep=2, keep_best=1, best_metric="eval/loss")
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0, 6: None}
    for step, loss in losses.items():
        ckpt.maybe_save(step, _state(step), {}, metrics=None if loss is None else {"eval/loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # best (2, loss 1.0) + the last two
    ckpt.close()
    maxed = checkpoints.Checkpointer(tmp_path / "max", save_every_steps=1, keep=1, keep_best=2, best_mode="max")
    for step, acc in {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.2}.items():
        maxed.maybe_save(step, _state(step), {}, metrics={"eval/loss": acc})
    maxed.wait()
    assert maxed.all_steps() == [1, 3, 4]
    maxed.close()


def test_interrupted_save_leaves_previous_restorable(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=10, async_save=False)
    ckpt.maybe_save(10, _state(10), {"i": 10})
    ckpt.close()
    # What a save killed mid-write leaves: orbax's temporary directory for the newer step, half written.
    partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1767225600000000"
    shutil.copytree(tmp_path / "checkpoints" / "10", partial)
    (partial / "state" / "manifest.ocdbt").unlink()
    reopened = checkpoints.Checkpointer(tmp_path, save_every_steps=10)
    assert reopened.latest_step() == 10
    state, data_state, _ = reopened.restore(abstract_state=_abstract(_state(0)))
    _assert_bitwise_equal(state, _state(10))
    assert data_state == {"i": 10}
    assert not partial.exists()  # cleaned up when the workdir is opened
    reopened.close()


def test_corrupt_checkpoint_names_step_and_earlier_step(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1, async_save=False)
    ckpt.maybe_save(1, _state(1), {})
    ckpt.maybe_save(2, _state(2), {})
    for chunk in (tmp_path / "checkpoints" / "2" / "state").glob("**/d/*"):
        chunk.write_bytes(chunk.read_bytes()[:7])  # truncated data files
    with pytest.raises(ValueError) as error:
        ckpt.restore(abstract_state=_abstract(_state(0)))
    message = str(error.value)
    print(message)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "checkpoints", "2") in message and "restore(step=1)" in message
    # Metadata gone: same kind of message, from the metadata read.
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=r"checkpoints/2 is corrupt.*restore\(step=1\)"):
        ckpt.restore(step=2, abstract_state=_abstract(_state(0)))
    state, _, _ = ckpt.restore(step=1, abstract_state=_abstract(_state(0)))
    _assert_bitwise_equal(state, _state(1))
    ckpt.close()


def _big_state(step: int) -> dict:
    """Random float32 data that zstd cannot shrink, so Orbax stores it raw in an out-of-line data file."""
    values = np.random.default_rng(step).standard_normal((256, 256)).astype(np.float32)
    return {"step": jnp.int32(step), "params": {"w": jnp.asarray(values)}}


def _largest_data_file(step_dir):
    return max((p for p in step_dir.glob("state/**/d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "file deleted": lambda step_dir: _largest_data_file(step_dir).unlink(),
    "file truncated": lambda step_dir: _largest_data_file(step_dir).write_bytes(b"\0" * 7),
    "byte flipped": lambda step_dir: _flip_byte(_largest_data_file(step_dir)),
    "metadata deleted": lambda step_dir: (step_dir / "state" / "_METADATA").unlink(),
    "metadata garbled": lambda step_dir: (step_dir / "state" / "_METADATA").write_text("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(tmp_path, damage, capsys):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1, keep=5)
    for step in (1, 2, 3):
        ckpt.maybe_save(step, _big_state(step), {"step": step})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "3"
    assert (step_dir / checkpoints.CHECKSUMS_FILE).is_file()  # written once each save was complete
    DAMAGE[damage](step_dir)
    reopened = checkpoints.Checkpointer(tmp_path, save_every_steps=1, keep=5)
    step, (state, data_state, _) = reopened.restore_latest_good(abstract_state=_abstract(_big_state(0)))
    assert step == 2 and data_state == {"step": 2}
    _assert_bitwise_equal(state, _big_state(2))
    warning = capsys.readouterr().err
    assert f"checkpoint {step_dir} is corrupt or incomplete" in warning and "checkpoints.corrupt/3" in warning
    assert reopened.all_steps() == [1, 2] and (tmp_path / "checkpoints.corrupt" / "3" / "state").is_dir()
    reopened.close()


def test_a_flipped_byte_loads_silently_without_the_manifest(tmp_path):
    """Why the manifest exists: Orbax reads raw array data back without checking it."""
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1)
    ckpt.maybe_save(1, _big_state(1), {})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "1"
    _flip_byte(_largest_data_file(step_dir))
    reopened = checkpoints.Checkpointer(tmp_path, save_every_steps=1)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="does not match its checksum"):
        reopened.restore(abstract_state=_abstract(_big_state(0)))
    (step_dir / checkpoints.CHECKSUMS_FILE).unlink()
    state, _, _ = reopened.restore(abstract_state=_abstract(_big_state(0)))
    differing = int(np.sum(np.asarray(state["params"]["w"]) != np.asarray(_big_state(1)["params"]["w"])))
    assert differing >= 1  # wrong numbers, no error
    reopened.close()


def test_every_step_damaged_is_an_error_not_a_fresh_start_and_a_config_mismatch_moves_nothing(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1)
    for step in (1, 2):
        ckpt.maybe_save(step, _big_state(step), {})
    ckpt.close()
    reopened = checkpoints.Checkpointer(tmp_path, save_every_steps=1)
    wrong_shape = {"step": jnp.int32(0), "params": {"w": jnp.zeros((4, 4), jnp.float32)}}
    with pytest.raises(ValueError, match="different model config") as error:
        reopened.restore_latest_good(abstract_state=_abstract(wrong_shape))
    assert not isinstance(error.value, checkpoints.CorruptCheckpointError) and reopened.all_steps() == [1, 2]
    for step in (1, 2):
        _flip_byte(_largest_data_file(tmp_path / "checkpoints" / str(step)))
    with pytest.raises(checkpoints.CorruptCheckpointError, match="every checkpoint in .* is damaged"):
        reopened.restore_latest_good(abstract_state=_abstract(_big_state(0)))
    assert reopened.all_steps() == [] and len(list((tmp_path / "checkpoints.corrupt").iterdir())) == 2
    reopened.close()


def test_different_model_config_names_first_mismatching_parameter(tmp_path, tiny_params):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1, async_save=False)
    ckpt.maybe_save(1, {"params": tiny_params}, {})
    wider = dict(TINY.to_dict(), d_ff=48)
    other = network.TransformerConfig.from_dict(wider)
    abstract = {"params": flax.linen.meta.unbox(network.abstract_params(other))}
    with pytest.raises(ValueError) as error:
        ckpt.restore(abstract_state=abstract)
    message = str(error.value)
    print(message)
    assert "\n" not in message
    assert "'params/decoder/layers_0/mlp/wi/kernel' with shape (16, 32) but the model expects (16, 48)" in message
    ckpt.close()


def test_load_params_from_converted_workdir(tmp_path, tiny_params):
    convert.save_converted(str(tmp_path), tiny_params, TINY)
    _assert_bitwise_equal(checkpoints.load_params(tmp_path), tiny_params)
    with pytest.raises(FileNotFoundError, match="neither checkpoints/"):
        checkpoints.load_params(tmp_path / "empty")


def test_save_vocabulary_once(tmp_path):
    from t5x_lite.data import vocab

    corpus = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "bird", "fish"] * 25)]
    vocabulary = vocab.train_vocabulary(corpus, vocab_size=30, cache_dir=tmp_path / "cache", extra_ids=4)
    ckpt = checkpoints.Checkpointer(tmp_path / "run", save_every_steps=1)
    directory = ckpt.save_vocabulary(vocabulary)
    assert directory == str(tmp_path / "run" / "vocab")
    loaded = vocab.Vocabulary.load(directory)
    assert loaded.encode("the cat sat") == vocabulary.encode("the cat sat")
    ckpt.close()


def test_sigterm_sets_flag_and_uninstall_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []
    handler = checkpoints.install_preemption_handler(seen.append)
    try:
        assert not checkpoints.preemption_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoints.preemption_requested() and handler.requested
        assert seen == [signal.SIGTERM]
    finally:
        handler.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not checkpoints.preemption_requested()


_RESHARD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5x_lite import checkpoints

    workdir = sys.argv[1]
    devices = np.array(jax.devices())
    assert devices.size == 8, devices
    row = Mesh(devices, ("fsdp",))
    grid = Mesh(devices.reshape(2, 4), ("data", "model"))
    w = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12)
    state = {"step": jnp.int32(7), "params": {"w": jax.device_put(w, NamedSharding(row, P("fsdp", None)))}}
    ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
    ckpt.maybe_save(7, state, {"i": 7})
    ckpt.wait()
    report = {}
    for name, spec_mesh, spec in [("grid", grid, P("data", "model")), ("replicated", grid, P())]:
        sharding = NamedSharding(spec_mesh, spec)
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(grid, P())),
                    "params": {"w": jax.ShapeDtypeStruct((8, 12), jnp.float32, sharding=sharding)}}
        restored, data_state, _ = ckpt.restore(abstract_state=abstract)
        out = restored["params"]["w"]
        report[name] = {"equal": bool(np.array_equal(np.asarray(out), np.asarray(w))),
                        "sharding_ok": out.sharding == sharding,
                        "shard_shape": list(out.addressable_shards[0].data.shape),
                        "step": int(restored["step"]), "data": data_state}
    ckpt.close()
    print(json.dumps(report))
    """
)


def test_restore_onto_a_different_mesh(tmp_path):
    env = cpu_subprocess_env(devices=8)
    result = subprocess.run(
        [sys.executable, "-c", _RESHARD, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["grid"] == {"equal": True, "sharding_ok": True, "shard_shape": [4, 3], "step": 7, "data": {"i": 7}}
    assert report["replicated"] == {
        "equal": True,
        "sharding_ok": True,
        "shard_shape": [8, 12],
        "step": 7,
        "data": {"i": 7},
    }


def test_orbax_read_only_notice_is_silenced_other_warnings_pass(tmp_path, caplog):
    import logging

    from absl import logging as absl_logging

    with caplog.at_level(logging.WARNING):
        absl_logging.warning("Given directory is read only=%s", tmp_path)
        absl_logging.warning("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.")
        absl_logging.warning("a warning that matters")
    assert "read only" not in caplog.text and "read_only" not in caplog.text
    assert "a warning that matters" in caplog.text


DISK_FULL = "RESOURCE_EXHAUSTED: Failed to write 498513 bytes to file 12: No space left on device [os_error_code='28']"


def test_a_save_that_runs_out_of_disk_says_where_and_keeps_the_earlier_steps(tmp_path, monkeypatch):
    ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1, async_save=False)
    ckpt.maybe_save(1, _big_state(1), {"step": 1})

    def full(*args, **kwargs):
        raise ValueError(DISK_FULL)  # what TensorStore raises when a write gets ENOSPC

    monkeypatch.setattr(ckpt._manager, "save", full)
    with pytest.raises(checkpoints.DiskFullError) as error:
        ckpt.maybe_save(2, _big_state(2), {"step": 2})
    message = str(error.value)
    assert f"no space left on device while saving step 2 in {tmp_path / 'checkpoints'}" in message
    assert "steps [1] are intact: free space and run the same command to resume from step 1" in message
    assert error.value.errno == 28
    monkeypatch.undo()
    state, data_state, _ = ckpt.restore(abstract_state=_abstract(_big_state(0)))
    _assert_bitwise_equal(state, _big_state(1))
    assert data_state == {"step": 1}
    ckpt.close()


def test_a_training_run_on_a_full_disk_stops_with_the_error_and_resumes_once_there_is_room(tmp_path):
    """A real full disk: a 9 MiB tmpfs holds two checkpoints of the demo and not a third (needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        reason = mounted.stderr.decode().strip()
        pytest.skip(f"cannot mount a small tmpfs here ({reason}); the injected-ENOSPC test above still runs")
    try:
        command = [
            sys.executable, "-m", "t5x_lite.train", f"--config={ROOT}/configs/demo.py:steps=60",
            f"--workdir={disk / 'run'}", "--config.checkpoint_every_steps=10", "--config.keep_checkpoints=5",
            "--config.eval_every_steps=1000", f"--config.vocab_cache_dir={tmp_path / 'vocab'}",
        ]  # fmt: skip
        full = subprocess.run(command, capture_output=True, text=True, env=cpu_subprocess_env(), timeout=300)
        assert full.returncode == 2, full.stderr[-2000:]
        # The command's one-line error, and none of the tracebacks that Orbax's writer thread, asyncio and TensorStore
        # print for the failed writes (t5x_lite.checkpoints and t5x_lite.cli drop them)
        errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        last = errors[0]
        assert last.startswith("error: [Errno 28] no space left on device while saving step ") and "intact" in last
        intact = [int(p.name) for p in (disk / "run" / "checkpoints").iterdir() if p.name.isdigit()]
        assert intact and f"resume from step {max(intact)}" in last
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = subprocess.run(command, capture_output=True, text=True, env=cpu_subprocess_env(), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming from step {max(intact)}" in resumed.stdout
        assert 60 in checkpoints.Checkpointer(disk / "run", save_every_steps=10, read_only=True).all_steps()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
