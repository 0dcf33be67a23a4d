"""Word-level distillation: the loss equals cross entropy for a one-hot teacher and vanishes against itself; a
student trains with the teacher run inside the jitted step (length-bucketed, precompiled too); bad settings fail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import losses, metrics, network, partitioning, quantize, train, trainer
from tests import tiny_config

VOCAB = 11


def _batch(seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(keys[0], (2, 5, VOCAB))
    targets = jax.random.randint(keys[1], (2, 5), 0, VOCAB)
    weights = (jax.random.uniform(keys[2], (2, 5)) > 0.3).astype(jnp.float32)
    return logits, targets, weights


@pytest.mark.parametrize("distill_weight", [0.3, 1.0])
def test_one_hot_teacher_gives_the_cross_entropy(distill_weight):
    logits, targets, weights = _batch(0)
    one_hot_teacher = 1e4 * jax.nn.one_hot(targets, VOCAB)  # softmax is exactly one-hot in float32
    expected = losses.cross_entropy(logits, targets, weights)
    got = losses.distillation_cross_entropy(logits, one_hot_teacher, targets, weights, distill_weight=distill_weight)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    assert float(got["weight_sum"]) == float(expected["weight_sum"]) and float(got["correct"]) == float(
        expected["correct"]
    )


def test_kl_term_vanishes_against_itself_and_scales_with_temperature():
    logits, targets, weights = _batch(1)
    alone = losses.distillation_cross_entropy(logits, logits, targets, weights, distill_weight=1.0, temperature=2.0)
    assert abs(float(alone["loss"])) < 1e-4
    teacher = logits + jax.random.normal(jax.random.key(5), logits.shape)
    half = losses.distillation_cross_entropy(logits, teacher, targets, weights, distill_weight=0.5, temperature=2.0)
    ce = losses.cross_entropy(logits, targets, weights)["loss"]
    kl = losses.distillation_cross_entropy(logits, teacher, targets, weights, distill_weight=1.0, temperature=2.0)
    np.testing.assert_allclose(half["loss"], 0.5 * ce + 0.5 * kl["loss"], rtol=1e-5)
    # The gradient flows to the student only.
    grad = jax.grad(lambda t: losses.distillation_cross_entropy(logits, t, targets, weights)["loss"])(teacher)
    assert not np.any(np.asarray(grad))


@pytest.mark.parametrize(
    "temperature, weight, message",
    [(0.0, 0.5, "distill_temperature=0.0 must be a positive number"), (1.0, 1.5, r"distill_weight=1.5 must be in")],
)
def test_bad_settings(temperature, weight, message):
    logits, targets, weights = _batch(2)
    with pytest.raises(ValueError, match=message):
        losses.distillation_cross_entropy(logits, logits, targets, temperature=temperature, distill_weight=weight)


def test_precompiled_step_binds_the_teacher_like_the_jitted_one():
    """``precompile_train_step`` (length-bucketed runs) lowers and compiles the step with the teacher bound."""
    student_cfg = network.TransformerConfig(
        vocab_size=32, d_model=16, num_heads=2, d_ff=16, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0
    )
    teacher_cfg = student_cfg.replace(d_ff=48, num_decoder_layers=2)
    teacher_params = network.init_params(teacher_cfg, jax.random.key(7))
    mesh = partitioning.make_mesh((-1, 1, 1))
    optimizer = optax.adam(1e-3)
    distillation = trainer.Distillation(teacher_cfg, temperature=2.0, weight=0.8)
    step = trainer.compile_train_step(
        student_cfg, optimizer, mesh, "data_parallel", distillation=distillation, teacher_params=teacher_params
    )
    tokens = jax.random.randint(jax.random.key(1), (8, 6), 2, 32)
    batch = {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": jnp.pad(tokens[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jnp.ones((8, 6), jnp.float32),
    }
    shapes = [{name: value.shape for name, value in batch.items()}]

    def fresh_state():
        return trainer.create_train_state(student_cfg, optimizer, jax.random.key(0), mesh, "data_parallel")

    with partitioning.activate(mesh, "data_parallel"):
        _, jitted_metrics = step(fresh_state(), batch, jax.random.key(3))
        precompiled = trainer.precompile_train_step(step, fresh_state(), shapes, mesh, "data_parallel")
        _, precompiled_metrics = precompiled(fresh_state(), batch, jax.random.key(3))
    assert float(precompiled_metrics["loss"]) == float(jitted_metrics["loss"])
    with pytest.raises(ValueError, match="give both distillation and teacher_params"):
        trainer.train_step(fresh_state(), batch, jax.random.key(3), model_cfg=student_cfg, optimizer=optimizer,
                           distillation=distillation)  # fmt: skip


def test_student_trains_against_the_teacher(tiny_trained, tmp_path):
    workdir, vocab_cache = tiny_trained
    config = tiny_config.get_config("steps=3")
    config.vocab_cache_dir = vocab_cache
    config.model_overrides.update(d_ff=32, num_heads=1)  # a smaller student
    config.distill_teacher = workdir
    config.distill_temperature = 2.0
    config.distill_weight = 0.7
    config.log_every_steps = 1
    train.train_and_evaluate(config, str(tmp_path / "student"))
    logged = [row for row in metrics.read_metrics(str(tmp_path / "student")) if "train/loss" in row]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all(np.isfinite(row["train/loss"]) for row in logged)

    # The teacher's term really enters the loss: weight 0 gives the plain cross entropy, another value.
    config.distill_weight = 0.0
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    plain = [row for row in metrics.read_metrics(str(tmp_path / "plain")) if "train/loss" in row]
    assert plain[0]["train/loss"] != pytest.approx(logged[0]["train/loss"], rel=1e-3)


def test_bad_teachers(tiny_trained, tmp_path):
    workdir, vocab_cache = tiny_trained
    config = tiny_config.get_config("steps=2")
    config.vocab_cache_dir = vocab_cache
    config.distill_teacher = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a trained workdir"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    quantize.quantize_workdir(workdir, str(tmp_path / "int8"), "int8")
    config.distill_teacher = str(tmp_path / "int8")
    with pytest.raises(ValueError, match="is quantized"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    config.distill_teacher = workdir
    config.distill_weight = -1.0
    with pytest.raises(ValueError, match="distill_weight=-1.0 must be in"):
        train.train_and_evaluate(config, str(tmp_path / "c"))
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_sequence_level_distillation_data_trains_a_student(tiny_trained, tmp_path):
    from t5x_lite import distill_data
    from t5x_lite.data.tasks import TaskRegistry

    workdir, vocab_cache = tiny_trained
    data = str(tmp_path / "kd")
    record = distill_data.write_distillation_data(workdir, data, beam_size=2, max_examples=16, batch_size=8)
    with open(f"{data}/train.tgt", encoding="utf-8") as f:
        outputs = f.read().split("\n")[:-1]
    assert record["examples"] == len(outputs) == 16
    base = TaskRegistry.get(record["base_task"])
    task = TaskRegistry.get(f"distilled:{data}")
    train_source, base_train = task.get_source("train"), base.get_source("train")
    assert [train_source[i]["inputs"] for i in range(16)] == [base_train[i]["inputs"] for i in range(16)]
    assert [train_source[i]["targets"] for i in range(16)] == outputs  # the teacher's outputs are the targets
    assert task.get_source("validation")[3] == base.get_source("validation")[3]  # scored on the real references

    config = tiny_config.get_config("steps=3")
    config.vocab_cache_dir = vocab_cache
    config.task, config.vocab_task = f"distilled:{data}", record["base_task"]
    config.eval_every_steps = 3
    train.train_and_evaluate(config, str(tmp_path / "student"))
    logged = [row["train/loss"] for row in metrics.read_metrics(str(tmp_path / "student")) if "train/loss" in row]
    assert logged and all(np.isfinite(logged))
    assert distill_data.main(["--teacher", workdir, "--out", data, "--max_examples", "4"]) == 2  # exists already
    with pytest.raises(ValueError, match="task.json not found"):
        TaskRegistry.get(f"distilled:{tmp_path / 'nothing'}")
