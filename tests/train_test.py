"""The train loop end to end on a tiny model: metrics, checkpoints, and a resumed run equal to a straight one."""

from __future__ import annotations

import json
import os
import threading

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, config_files, metrics, train
from t5x_lite.data.tasks import Task, TaskRegistry, task_vocabulary
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


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = _config(tmp_path, 12)
    config.learning_rate, config.schedule = 1e30, "constant"  # the first update overflows the parameters
    with pytest.raises(
        train.TrainingError, match=r"non-finite loss nan at step 3; no checkpoint was saved yet"
    ) as raised:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    # The data pipeline's prefetch thread is stopped on the way out, also while the error's traceback (which holds the
    # iterator) is alive, as when the command prints it and exits: a thread left running into interpreter exit is
    # torn down inside SentencePiece's C++ and aborts the process after the error was printed (SIGABRT, not status 2).
    assert raised.tb is not None and not [
        t.name for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")
    ]


def test_nonfinite_updates_can_be_skipped(tmp_path):
    config = _config(tmp_path, 6)
    config.learning_rate, config.schedule = 1e30, "constant"
    config.skip_nonfinite_updates = True
    train.train_and_evaluate(config, str(tmp_path / "run"))
    rows = [r for r in metrics.read_metrics(tmp_path / "run") if "train/skipped" in r]
    assert rows[-1]["train/skipped"] == 1.0
    params = checkpoints.load_params(tmp_path / "run", step=6)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_init_from_a_converted_checkpoint(straight, tmp_path):
    from t5x_lite import convert, network

    _, workdir, _ = straight
    params = checkpoints.load_params(workdir, step=12)
    with open(f"{workdir}/config.json", encoding="utf-8") as f:
        model = network.TransformerConfig.from_dict(json.load(f)["model"])
    convert.save_converted(str(tmp_path / "converted"), params, model)
    config = _config(tmp_path, 1)
    config.init_from = str(tmp_path / "converted")
    config.learning_rate, config.schedule = 1e-12, "constant"  # one step that barely moves the parameters
    train.train_and_evaluate(config, str(tmp_path / "finetune"))
    tuned = checkpoints.load_params(tmp_path / "finetune", step=1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned, params)
    config.model_overrides.d_model = 48
    with pytest.raises(ValueError, match=r"TransformerConfig\.d_model=48 does not match the checkpoint in"):
        train.train_and_evaluate(config, str(tmp_path / "mismatch"))


def test_fused_attention_with_packing_is_refused_before_anything_runs(tmp_path):
    config = _config(tmp_path, 1)
    config.pack = True
    config.model_overrides.update(dict(attention_kernel="xla", dropout_rate=0.0))
    with pytest.raises(ValueError, match=r"attention_kernel='xla' takes padded batches only.*pack=False"):
        train.train_and_evaluate(config, str(tmp_path / "packed"))
    assert not (tmp_path / "packed" / "config.json").exists()


def test_a_bad_model_override_fails_before_the_vocabulary_is_trained(tmp_path):
    config = _config(tmp_path, 1)
    config.model_overrides.num_heads = 0
    with pytest.raises(ValueError, match=r"TransformerConfig\.num_heads=0: must be a positive integer"):
        train.train_and_evaluate(config, str(tmp_path / "bad_model"))
    assert not (tmp_path / "vocab_cache").exists()  # no vocabulary was trained first


# ----------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_saves_the_step_and_a_resumed_run_stays_stopped(tmp_path, capsys):
    config = _config(tmp_path, 12)
    config.eval_every_steps = 3
    config.best_metric, config.best_mode = "eval/exact_match", "max"  # a tiny model never gets a number right
    config.early_stopping_patience = 1
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    assert (
        "early stopping at step 6: eval/exact_match has not improved on 0 for 1 evaluations" in capsys.readouterr().out
    )
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows if "eval/exact_match" in r] == [3, 6]
    assert [r["eval/evals_without_improvement"] for r in rows if "eval/exact_match" in r] == [0.0, 1.0]
    ckpt = checkpoints.Checkpointer(workdir, save_every_steps=6)
    assert ckpt.latest_step() == 6
    ckpt.close()
    again = train.train_and_evaluate(config, workdir)  # the same command again: nothing more is trained
    assert "eval/exact_match" in again
    assert max(r["step"] for r in metrics.read_metrics(workdir)) == 6
    with pytest.raises(ValueError, match="early_stopping_patience=-1 must be >= 0"):
        train.EarlyStopping("eval/loss", "min", -1)


def test_early_stopping_counts_evaluations_without_improvement():
    stopper = train.EarlyStopping("eval/bleu", "max", patience=2)
    for value, expected in [(10.0, 0), (12.0, 0), (11.0, 1), (12.0, 2)]:
        stopper.update({"eval/bleu": value})
        assert stopper.evals_without_improvement == expected
    assert stopper.should_stop and stopper.best == 12.0
    restored = train.EarlyStopping("eval/bleu", "max", patience=2)
    restored.load(stopper.state())
    assert restored.should_stop and restored.best == 12.0
    with pytest.raises(ValueError, match="needs best_metric='eval/bleu' from every evaluation"):
        stopper.update({"eval/loss": 1.0})


# ----------------------------------------------------------------------------------------------- bucketed batches


def test_bucketed_translation_run_logs_validation_bleu_and_resumes_exactly(shared_data, tmp_path):
    """configs/multi30k.py on a tiny model: length-bucketed batches, the fused loss, hash dropout, greedy
    validation BLEU (eval/tok_bleu, eval/bleu) every few steps, and a resumed run equal to a straight one."""

    def config(steps):  # no cooldown: it depends on num_train_steps, which the interrupted run below shortens
        cfg = config_files.load_config(
            f"{os.path.dirname(__file__)}/../configs/multi30k.py:steps={steps},cooldown=0,batch_tokens=512,eval_every=4"
        )
        cfg.data_dir = str(shared_data)
        cfg.vocab_cache_dir = str(tmp_path / "vocab_cache")
        cfg.model_overrides.update(dict(d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1))
        cfg.eval_examples, cfg.log_every_steps, cfg.checkpoint_every_steps = 16, 2, 4
        cfg.warmup_steps, cfg.eval_batch_size = 2, 8
        return cfg

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    final = train.train_and_evaluate(config(8), straight)
    assert {"eval/tok_bleu", "eval/bleu", "eval/bleu_intl", "eval/loss"} <= set(final) and final["eval/examples"] == 16
    rows = metrics.read_metrics(straight)
    assert [r["step"] for r in rows if "eval/tok_bleu" in r] == [4, 8]
    assert all(np.isfinite(r["perf/target_tokens_per_sec"]) for r in rows if "train/loss" in r)
    train.train_and_evaluate(config(4), resumed)  # as if stopped after saving step 4
    train.train_and_evaluate(config(8), resumed)
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoints.load_params(resumed, step=8),
        checkpoints.load_params(straight, step=8),
    )


def test_vocab_size_trains_a_vocabulary_of_that_size_and_bad_values_are_refused(straight, tmp_path):
    """``config.vocab_size`` overrides the task's vocabulary size (the demo task's: 256 pieces), as a researcher
    sweeping the vocabulary expects; a checkpoint's own vocabulary cannot be resized under it."""
    task = TaskRegistry.get("synthetic_numbers")
    config = _config(tmp_path, 12)
    default = train._vocabulary(config, task, str(tmp_path / "default"))
    config.vocab_size = 200
    smaller = train._vocabulary(config, task, str(tmp_path / "smaller"))
    assert default.vocab_size - default.extra_ids == 256 and smaller.vocab_size - smaller.extra_ids == 200
    assert default.fingerprint != smaller.fingerprint
    config.vocab_size = -1  # (ml_collections itself refuses a value that is not an int)
    with pytest.raises(ValueError, match=r"config\.vocab_size=-1 must be a whole number of pieces >= 0"):
        train._vocabulary(config, task, str(tmp_path / "bad"))
    _, base_workdir, _ = straight
    config.vocab_size, config.init_from = 200, base_workdir
    with pytest.raises(
        ValueError, match=r"config\.vocab_size=200, but init_from=.* brings its own vocabulary \(256 pieces\)"
    ):
        train._vocabulary(config, task, str(tmp_path / "finetune"))
    config.vocab_size = 256  # the checkpoint's own size: accepted
    assert train._vocabulary(config, task, str(tmp_path / "finetune")).fingerprint == default.fingerprint
    fixed = Task(name="fixed_vocab", splits={"train": ("synthetic_numbers", "train")}, vocab_path="/models/t5.spm")
    with pytest.raises(
        ValueError, match=r"vocab_size=200 sets the size .* uses the fixed SentencePiece model /models/t5"
    ):
        task_vocabulary(fixed, vocab_size=200)
