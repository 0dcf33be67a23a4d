"""Unstructured magnitude pruning: Zhu & Gupta's schedule, exact cuts by magnitude, a training run that ends at the
asked sparsity with embeddings, norms and biases dense, and clear errors for bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import checkpoints, metrics, optimizers, sparsity, train
from tests import tiny_config


def test_the_schedule_rises_as_a_cubic_and_then_holds():
    values = [float(sparsity.sparsity_at(step, 0.8, 10, 20)) for step in (0, 10, 15, 20, 100)]
    assert values[:2] == [0.0, 0.0] and values[3:] == pytest.approx([0.8, 0.8])
    assert values[2] == pytest.approx(0.8 * (1 - 0.5**3))


def test_cuts_exactly_the_smallest_magnitudes():
    weight = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, 41)).reshape(5, 8) * [[1, -1] * 4])
    pruned = np.asarray(sparsity.prune_by_magnitude(weight.astype(jnp.float32), jnp.asarray(0.25)))
    assert (pruned == 0).sum() == 10
    np.testing.assert_array_equal(pruned != 0, np.abs(np.asarray(weight)) > 10)
    np.testing.assert_array_equal(sparsity.prune_by_magnitude(weight, jnp.asarray(0.0)), weight)


def test_a_wrapped_optimizer_reaches_the_sparsity_and_leaves_other_parameters_alone():
    params = {"dense": {"kernel": jnp.ones((8, 8)) + jnp.arange(64.0).reshape(8, 8)}, "norm": {"scale": jnp.ones(8)}}
    tx = sparsity.magnitude_pruning(optax.sgd(1e-3), 0.5, 0, 4)
    state = tx.init(params)
    for _ in range(6):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert sparsity.measured_sparsity(params) == 0.5 and not np.any(np.asarray(params["norm"]["scale"]) == 0)


def test_training_with_magnitude_pruning(tmp_path):
    config = tiny_config.get_config("steps=12")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.prune_sparsity = 0.6
    config.prune_start_step = 3
    config.prune_end_step = 9
    train.train_and_evaluate(config, str(tmp_path / "run"))
    params = checkpoints.load_params(str(tmp_path / "run"))
    assert sparsity.measured_sparsity(params) == pytest.approx(0.6, abs=0.01)
    assert not np.any(np.asarray(params["token_embedder"]["embedding"]) == 0)
    losses = [row["train/loss"] for row in metrics.read_metrics(str(tmp_path / "run")) if "train/loss" in row]
    assert all(np.isfinite(losses))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(prune_sparsity=1.0), r"prune_sparsity=1.0 must be in \[0, 1\)"),
        (dict(prune_sparsity=0.5, prune_start_step=5, prune_end_step=5), "needs 0 <= prune_start_step < prune_end"),
    ],
)
def test_bad_settings(changes, message):
    config = tiny_config.get_config("steps=12")
    config.update(changes)
    with pytest.raises(ValueError, match=message):
        optimizers.make_optimizer(config)
