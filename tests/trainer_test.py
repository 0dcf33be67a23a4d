"""Train step: learning, microbatch equivalence, determinism, bf16 activations, eval, donation and sharded parity.

The sharded runs need 8 forced CPU devices, which must be set before jax starts, so they run in a subprocess
(``_sharded_report``) that this module starts first and reads last: it runs while the in-process tests do.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import network, optimizers, partitioning, trainer
from tests.conftest import REPO_ROOT, cpu_subprocess_env

ROOT = REPO_ROOT
TINY = dict(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    scan_layers=True,
)
OPTIMIZER = dict(optimizer="adafactor", learning_rate=0.01, schedule="constant")


def _copy_batch(seed: int = 0, batch: int = 8, length: int = 8) -> dict[str, np.ndarray]:
    """A fixed copy task: the target is the input; the last rows end in padding (weight 0)."""
    tokens = np.random.default_rng(seed).integers(2, TINY["vocab_size"], (batch, length)).astype(np.int32)
    tokens[batch // 2 :, -2:] = 0
    decoder_input = np.concatenate([np.zeros((batch, 1), np.int32), tokens[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": decoder_input,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": (tokens > 0).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------------------------
# 8 forced CPU devices, in a subprocess started before the other tests.
# --------------------------------------------------------------------------------------------------------------


def _sharded_report(steps: int = 20) -> None:
    """Runs with 8 CPU devices: the loss curve of ``steps`` steps on a 1-device mesh, (data=4, model=2) under
    fsdp_tp and fsdp=8 under fsdp, from the same initial state; prints one JSON line."""
    assert jax.device_count() == 8, jax.devices()
    cfg = network.TransformerConfig(**TINY)
    tx = optimizers.make_optimizer(OPTIMIZER, logical_axes=network.param_logical_axes(cfg))
    batch = _copy_batch()
    initial = None
    report: dict = {"losses": {}}
    for shape, rules in [((1, 1, 1), "fsdp_tp"), ((4, 1, 2), "fsdp_tp"), ((1, 8, 1), "fsdp")]:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = partitioning.make_mesh(shape, devices=devices)
        shardings = trainer.state_shardings(cfg, tx, mesh, rules)
        if initial is None:
            state = trainer.create_train_state(cfg, tx, jax.random.key(0), mesh, rules)
            report["created_on_shardings"] = all(
                leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
                for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True)
            )
            initial = jax.device_get(state)
        else:
            state = jax.device_put(initial, shardings)
        step = trainer.compile_train_step(cfg, tx, mesh, rules, schedule=optimizers.make_schedule(OPTIMIZER))
        curve = []
        with partitioning.activate(mesh, rules):
            for _ in range(steps):
                previous = state
                state, metrics = step(state, batch, jax.random.key(1))
                curve.append(float(metrics["loss"]))
        # Adafactor's (1,) placeholders for unfactored parameters come back as constants: XLA cannot reuse them.
        donated = [x.is_deleted() for x in jax.tree.leaves(previous) if x.shape != (1,)]
        report["donated"] = report.get("donated", True) and all(donated) and len(donated) > 1
        report["output_sharded"] = all(
            leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
            for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True)
        )
        report["losses"][f"{shape}/{rules}"] = curve
        if shape == (4, 1, 2):  # eval of the initial parameters = the first training loss
            evaluate = trainer.compile_eval_step(cfg, mesh, rules)
            with partitioning.activate(mesh, rules):
                report["eval_loss"] = float(evaluate(initial.params, batch)["loss"])
    # Residual dropout with the hash generator and the fused projection + loss: still the same on every mesh.
    dropout_cfg = cfg.replace(dropout_rate=0.3, dropout_generator="hash")
    report["hash_losses"] = {}
    for shape, rules in [((1, 1, 1), "fsdp_tp"), ((8, 1, 1), "data_parallel"), ((4, 1, 2), "fsdp_tp")]:
        mesh = partitioning.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])
        state = jax.device_put(initial, trainer.state_shardings(dropout_cfg, tx, mesh, rules))
        step = trainer.compile_train_step(dropout_cfg, tx, mesh, rules, label_smoothing=0.1, loss_chunk_tokens=16)
        curve = []
        with partitioning.activate(mesh, rules):
            for _ in range(5):
                state, metrics = step(state, batch, jax.random.key(1))
                curve.append(float(metrics["loss"]))
        report["hash_losses"][f"{shape}/{rules}"] = curve
    print(json.dumps(report))


@pytest.fixture(scope="module", autouse=True)
def sharded_process():
    """Starts the 8-device subprocess when the module starts; the test at the end of the file reads it."""
    env = cpu_subprocess_env(devices=8)
    code = "from tests.trainer_test import _sharded_report; _sharded_report()"
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


# --------------------------------------------------------------------------------------------------------------
# In this process (1 device).
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    cfg = network.TransformerConfig(**TINY)
    tx = optimizers.make_optimizer(OPTIMIZER, logical_axes=network.param_logical_axes(cfg))
    state = trainer.create_train_state(cfg, tx, jax.random.key(0))
    return cfg, tx, state, _copy_batch()


LOSS_OPTIONS = dict(z_loss=1e-4, label_smoothing=0.1)


def _jit_step(cfg, tx, **kwargs):
    schedule = optimizers.make_schedule(OPTIMIZER)
    return jax.jit(functools.partial(trainer.train_step, model_cfg=cfg, optimizer=tx, schedule=schedule, **kwargs))


@pytest.fixture(scope="module")
def step(setup):
    """One compiled full-batch step shared by the tests (each compilation costs seconds)."""
    cfg, tx, _, _ = setup
    return _jit_step(cfg, tx, **LOSS_OPTIONS)


def _run(step, state, batch, steps: int):
    curve = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
        curve.append(metrics)
    return state, curve


def test_loss_decreases_on_a_copy_task(setup, step):
    _, _, state, batch = setup
    final, curve = _run(step, state, batch, 20)
    losses = [float(m["loss"]) for m in curve]
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(final.step) == 20
    metrics = curve[0]
    assert set(metrics) == {"loss", "z_loss", "accuracy", "weight_sum", "grad_norm", "learning_rate"}
    assert float(metrics["weight_sum"]) == 8 * 8 - 4 * 2  # padding is not counted
    assert float(metrics["learning_rate"]) == pytest.approx(0.01)
    assert float(metrics["grad_norm"]) > 0 and float(metrics["z_loss"]) > 0


def test_four_microbatches_equal_the_full_batch(setup, step):
    cfg, tx, state, batch = setup
    full, full_metrics = step(state, batch, jax.random.key(1))
    micro, micro_metrics = _jit_step(cfg, tx, num_microbatches=4, **LOSS_OPTIONS)(state, batch, jax.random.key(1))
    deltas = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), full.params, micro.params)
    assert max(jax.tree.leaves(deltas)) < 1e-6, deltas
    for key in full_metrics:
        assert float(micro_metrics[key]) == pytest.approx(float(full_metrics[key]), rel=1e-5, abs=1e-7), key


def test_microbatches_must_divide_the_batch(setup):
    cfg, tx, state, batch = setup
    three = functools.partial(trainer.train_step, model_cfg=cfg, optimizer=tx, num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches=3 does not divide the batch size 8"):
        jax.eval_shape(three, state, batch, jax.random.key(1))


def test_same_seed_gives_bitwise_identical_state(setup, step):
    _, _, state, batch = setup
    runs = [jax.device_get(_run(step, state, batch, 5)[0]) for _ in range(2)]
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(runs[0].params)[0], jax.tree.leaves(state.params)[0])


def test_bf16_activations_train_with_fp32_params_and_optimizer_state(setup):
    cfg, tx, state, batch = setup
    final, curve = _run(_jit_step(cfg.replace(dtype="bfloat16"), tx), state, batch, 10)
    losses = [float(m["loss"]) for m in curve]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    for leaf in jax.tree.leaves((final.params, final.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert any(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final.opt_state))


def test_fused_loss_trains_like_the_logits_loss(setup, step):
    """``loss_chunk_tokens`` > 0 (projection and loss fused, in chunks) gives the same metrics and the same
    parameters, to float rounding, as the materialized logits."""
    cfg, tx, state, batch = setup
    fused = _jit_step(cfg, tx, loss_chunk_tokens=16, **LOSS_OPTIONS)
    plain_state, plain_curve = _run(step, state, batch, 3)
    fused_state, fused_curve = _run(fused, state, batch, 3)
    for plain, ours in zip(plain_curve, fused_curve, strict=True):
        for key in ("loss", "z_loss", "weight_sum", "grad_norm"):
            np.testing.assert_allclose(ours[key], plain[key], rtol=2e-5, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fused_state.params, plain_state.params
    )


def test_eval_step_matches_loss_fn(setup):
    cfg, _, state, batch = setup
    loss, aux = jax.jit(functools.partial(trainer.loss_fn, model_cfg=cfg, dropout_rng=None, **LOSS_OPTIONS))(
        state.params, batch
    )
    metrics = jax.jit(functools.partial(trainer.eval_step, model_cfg=cfg, **LOSS_OPTIONS))(state.params, batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(float(aux["accuracy"]), rel=1e-6)
    assert float(metrics["loss_sum"]) == pytest.approx(float(loss) * float(metrics["weight_sum"]), rel=1e-5)


def test_state_shardings_follow_the_parameters_even_under_activate():
    """AdamW moments take their parameter's sharding; computing shardings inside activate() adds no constraints."""
    cfg = network.TransformerConfig(**TINY)
    tx = optimizers.make_optimizer(dict(optimizer="adamw", weight_decay=0.1, grad_clip_norm=1.0))
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with partitioning.activate(mesh, "fsdp_tp"):
        shardings = trainer.state_shardings(cfg, tx, mesh, "fsdp_tp")
    adam = shardings.opt_state[1][0]  # chain(clip_by_global_norm, adamw): adamw = chain(scale_by_adam, ...)
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, shardings.params)
    assert adam.count.spec == jax.sharding.PartitionSpec() and shardings.step.spec == jax.sharding.PartitionSpec()


# --------------------------------------------------------------------------------------------------------------
# Reads the 8-device subprocess (keep last: it has been running since the module started).
# --------------------------------------------------------------------------------------------------------------


def test_sharded_training_matches_one_device_and_donates_the_state(sharded_process):
    try:
        out, err = sharded_process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        sharded_process.kill()
        out, err = sharded_process.communicate()
        pytest.fail(f"8-device subprocess timed out; stderr tail:\n{err[-3000:]}")
    if sharded_process.returncode != 0:
        pytest.fail(f"8-device subprocess exited with {sharded_process.returncode}; stderr tail:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["created_on_shardings"] and report["output_sharded"] and report["donated"]
    curves = report["losses"]
    reference = np.asarray(curves.pop("(1, 1, 1)/fsdp_tp"))
    assert len(reference) == 20 and reference[-1] < reference[0]
    for name, curve in curves.items():
        np.testing.assert_allclose(curve, reference, rtol=1e-5, err_msg=name)
    assert report["eval_loss"] == pytest.approx(reference[0], rel=1e-5)
    hashed = report["hash_losses"]
    reference = np.asarray(hashed.pop("(1, 1, 1)/fsdp_tp"))
    for name, curve in hashed.items():
        np.testing.assert_allclose(curve, reference, rtol=1e-5, err_msg=name)
