"""The train loop end to end on a tiny model: metrics, checkpoints, and a resumed run equal to a straight one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, metrics, train
from tests import tiny_config


def _config(tmp_path, steps: int):
    config = tiny_config.get_config(f"steps={steps}")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(_config(tmp_path, 12), workdir)
    return tmp_path, workdir, final


def test_metrics_checkpoints_and_files(straight):
    _, workdir, final = straight
    rows = metrics.read_metrics(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    for key in ("train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm", "perf/step_time", "perf/mfu"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert {"eval/loss", "eval/exact_match"} <= set(final) and final["eval/examples"] == 16
    ckpt = checkpoints.Checkpointer(workdir, save_every_steps=6)
    assert ckpt.all_steps() == [6, 12]
    ckpt.close()


def test_resumed_run_equals_straight_run(straight, tmp_path):
    _, workdir, _ = straight
    resumed_dir = str(tmp_path / "resumed")
    train.train_and_evaluate(_config(tmp_path, 6), resumed_dir)  # stops at step 6 (as if killed after saving)
    train.train_and_evaluate(_config(tmp_path, 12), resumed_dir)  # resumes from 6
    rows = metrics.read_metrics(resumed_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
    straight_params = checkpoints.load_params(workdir, step=12)
    resumed_params = checkpoints.load_params(resumed_dir, step=12)
    jax.tree.map(np.testing.assert_array_equal, resumed_params, straight_params)
