"""Workdirs in a bucket: a run with ``--workdir gs://...`` trains, resumes and evaluates exactly as on a local disk.

A local GCS emulator (gcp-storage-emulator, in the dev extra) stands in for Cloud Storage: gcsfs (our files, Orbax's
metadata) finds it through ``STORAGE_EMULATOR_HOST`` and TensorStore (Orbax's arrays) through
``TENSORSTORE_GCS_HTTP_URL``, so every byte goes through the same client code as against the real service."""

from __future__ import annotations

import json
import os
import socket

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, evaluation, fileio, metrics, train
from t5x_lite.data.tasks import TaskRegistry, task_vocabulary
from t5x_lite.data.vocab import Vocabulary
from tests import tiny_config

BUCKET = "t5x-lite-test"


@pytest.fixture(scope="module")
def bucket():
    """``gs://BUCKET`` served by an in-memory emulator on a free local port for the module's tests."""
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="pip install -e '.[dev]' (GCS emulator)")
    pytest.importorskip("gcsfs", reason="pip install -e '.[gcs]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict(zip(names, (f"http://127.0.0.1:{port}",) * 2 + ("test",), strict=True)))
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _config(tmp_path, steps: int):
    config = tiny_config.get_config(f"steps={steps}")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    return config


def test_local_paths_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(fileio.workdir_path("run")) == str(tmp_path / "run")
    assert str(fileio.workdir_path("gs://b/run")) == "gs://b/run"
    assert fileio.is_url("gs://b/run") and not fileio.is_url(tmp_path)


def test_append_and_atomic_write_on_disk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    fileio.append_text(path, "a\n")
    fileio.append_text(path, "b\n")
    assert path.read_text() == "a\nb\n"
    fileio.write_bytes_atomic(tmp_path / "x.bin", b"1")
    fileio.write_bytes_atomic(tmp_path / "x.bin", b"22")
    assert (tmp_path / "x.bin").read_bytes() == b"22"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "x.bin"]  # no temporary file left


def test_append_rewrites_an_object_whole(bucket):
    path = f"{bucket}/append/metrics.jsonl"
    fileio.append_text(path, "a\n")
    fileio.append_text(path, "b\n")
    assert fileio.workdir_path(path).read_text() == "a\nb\n"


def test_vocabulary_round_trips_through_a_bucket(bucket, tmp_path):
    config = _config(tmp_path, 6)
    vocab = task_vocabulary(TaskRegistry.get(config.task), cache_dir=config.vocab_cache_dir)
    vocab.save(f"{bucket}/vocab_test")
    assert Vocabulary.load(f"{bucket}/vocab_test") == vocab


# The emulator now and then answers TensorStore's conditional write of OCDBT's manifest with a generation that
# TensorStore refuses ("Malformed StorageGeneration"; seen once in about five CI runs, never on the same step); Cloud
# Storage itself does not. Only that error reruns the test, in a fresh bucket folder; any other failure fails it.
@pytest.mark.flaky(reruns=5, only_rerun=["Malformed StorageGeneration"])
def test_training_in_a_bucket_resumes_and_equals_training_on_disk(bucket, tmp_path):
    local = str(tmp_path / "local")
    remote = f"{bucket}/{tmp_path.name}/run"  # a fresh folder per attempt: a rerun never resumes a failed one
    train.train_and_evaluate(_config(tmp_path, 12), local)
    train.train_and_evaluate(_config(tmp_path, 6), remote)  # stops at step 6, as if preempted after saving
    final = train.train_and_evaluate(_config(tmp_path, 12), remote)  # resumes from the bucket's checkpoint
    assert final["eval/examples"] == 16

    jax.tree.map(
        np.testing.assert_array_equal, checkpoints.load_params(remote, step=12), checkpoints.load_params(local, step=12)
    )
    rows = metrics.read_metrics(remote)
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
    local_rows = metrics.read_metrics(local)
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [
        r["train/loss"] for r in local_rows if "train/loss" in r
    ]

    root = fileio.workdir_path(remote)
    assert json.loads((root / "config.json").read_text())["config"]["task"] == _config(tmp_path, 12).task
    events = [p for p in (root / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 2 and all(p.stat().length > 0 for p in events)  # one per launch, both uploaded
    assert "prediction:" in train.show_examples(remote, 2)

    loaded = evaluation.load_workdir(remote)
    assert loaded.steps == [12] and loaded.vocab == Vocabulary.load(os.path.join(local, "vocab"))
