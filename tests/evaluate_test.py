"""Evaluation end to end on a tiny trained model: periodic eval logs the task's metrics, the evaluate and infer
commands agree with each other, checkpoint averaging is a mean, and decoding scores are log-likelihoods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import evaluation, metrics, models, train
from t5x_lite.data.tasks import TaskRegistry
from t5x_lite.network import TransformerConfig
from tests import tiny_config
from tests.conftest import REPO_ROOT, cpu_subprocess_env, random_params

SCORED_TASK = "synthetic_numbers_scored"  # the demo task, also scored by BLEU and ROUGE


def _register_scored_task() -> None:
    if SCORED_TASK not in TaskRegistry.names():
        base = TaskRegistry.get("synthetic_numbers")
        TaskRegistry.add(
            SCORED_TASK,
            splits=dict(base.splits),
            metrics=("exact_match", "bleu", "rouge"),
            lengths=dict(base.lengths),
            vocab_size=base.vocab_size,
            vocab_training_examples=base.vocab_training_examples,
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    _register_scored_task()
    tmp_path = tmp_path_factory.mktemp("evaluate")
    config = tiny_config.get_config("steps=12")
    config.task = SCORED_TASK
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.checkpoint_every_steps = 4
    config.keep_checkpoints = 3
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    return workdir, final


def _run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=cpu_subprocess_env(),
        timeout=600,
    )


def test_periodic_eval_logs_the_task_metrics(trained):
    workdir, final = trained
    for key in ("eval/loss", "eval/exact_match", "eval/bleu", "eval/bleu_intl", "eval/rouge1", "eval/rougeLsum"):
        assert key in final and np.isfinite(final[key]), key
    logged = [row for row in metrics.read_metrics(workdir) if "eval/bleu" in row]
    assert [row["step"] for row in logged] == [12] and logged[0]["eval/examples"] == 16


def test_evaluate_command_writes_predictions_and_metrics(trained):
    workdir, _ = trained
    args = ["--workdir", workdir, "--task", "synthetic_numbers", "--split", "test", "--max_examples", "20"]
    done = _run("t5x_lite.evaluate", *args, "--beam_size", "2", "--average_last", "2", "--batch_size", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "average of steps [8, 12], beam search (beam 2, alpha 0.6)" in done.stdout
    stem = os.path.join(workdir, "eval", "test.avg2_8-12.beam2_alpha0.6")
    with open(f"{stem}.predictions.txt", encoding="utf-8") as f:
        predictions = f.read().splitlines()
    with open(f"{stem}.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert len(predictions) == 20 and summary["checkpoint_steps"] == [8, 12]
    source = TaskRegistry.get("synthetic_numbers").get_source("test")
    references = [source[i]["references"] for i in range(20)]
    assert summary["metrics"]["exact_match"] == pytest.approx(metrics.exact_match(predictions, references))
    assert f"{summary['metrics']['exact_match']:.2f}" in done.stdout


def test_evaluate_prints_the_sacrebleu_signature(trained):
    workdir, _ = trained
    done = _run(
        "t5x_lite.evaluate", "--workdir", workdir, "--split", "test", "--max_examples", "8", "--batch_size", "8"
    )
    # The scored task is not registered in a fresh process: the error says which task and what to do.
    assert done.returncode != 0 and SCORED_TASK in done.stderr
    done = _run(
        "t5x_lite.evaluate",
        "--workdir",
        workdir,
        "--task",
        "synthetic_numbers",
        "--max_examples",
        "8",
        "--checkpoint_step",
        "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 4, greedy" in done.stdout


def test_bad_requests_are_refused_with_the_fix(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(ValueError, match=r"--average_last=5 but .* holds 3 checkpoint\(s\) \(steps \[4, 8, 12\]\)"):
        evaluation.load_workdir(workdir, average_last=5, task="synthetic_numbers")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .* available steps: \[4, 8, 12\]"):
        evaluation.load_workdir(workdir, checkpoint_step=7, task="synthetic_numbers")
    with pytest.raises(ValueError, match="not both"):
        evaluation.load_workdir(workdir, checkpoint_step=4, average_last=2, task="synthetic_numbers")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        evaluation.load_workdir(str(tmp_path))
    done = _run("t5x_lite.evaluate", "--workdir", workdir, "--task", "synthetic_numbers", "--split", "dev")
    assert done.returncode != 0 and "--split='dev'" in done.stderr and "'test'" in done.stderr


def test_average_last_is_the_mean_of_the_last_checkpoints(trained):
    workdir, _ = trained
    averaged = evaluation.load_workdir(workdir, average_last=2, task="synthetic_numbers")
    first = evaluation.load_workdir(workdir, checkpoint_step=8, task="synthetic_numbers").params
    second = evaluation.load_workdir(workdir, checkpoint_step=12, task="synthetic_numbers").params
    assert averaged.steps == [8, 12]
    jax.tree.map(lambda a, x, y: np.testing.assert_allclose(a, (x + y) / 2, rtol=1e-6), averaged.params, first, second)


def test_infer_streams_what_evaluate_decodes(trained):
    workdir, _ = trained
    loaded = evaluation.load_workdir(workdir, task="synthetic_numbers")
    source = loaded.task.get_source("test")
    inputs = [source[i]["inputs"] for i in range(10)]
    done = _run(
        "t5x_lite.infer",
        "--workdir",
        workdir,
        "--task",
        "synthetic_numbers",
        "--batch_size",
        "4",
        stdin="\n".join(inputs) + "\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    streamed = done.stdout.splitlines()
    mesh, rules = evaluation.partitioning.make_mesh((-1, 1, 1)), "data_parallel"
    result = evaluation.evaluate_split(
        loaded.task,
        loaded.vocab,
        loaded.model_cfg,
        loaded.params,
        split="test",
        settings=models.DecodeSettings(),
        batch_size=8,
        mesh=mesh,
        rules=rules,
        max_examples=10,
    )
    assert streamed == result.predictions


# --------------------------------------------------------------------------------------- models.py


def _small_model():
    cfg = TransformerConfig(
        vocab_size=30, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0
    )
    return cfg, random_params(cfg, seed=5)


@pytest.mark.parametrize(
    "settings",
    [
        models.DecodeSettings(),
        models.DecodeSettings(beam_size=3, alpha=0.0),
        models.DecodeSettings(temperature=0.8, top_k=5),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_decoding_scores_are_the_log_likelihood_of_the_decoded_tokens(settings):
    cfg, params = _small_model()
    inputs = jnp.asarray(np.random.default_rng(1).integers(2, 30, (4, 6)), jnp.int32)
    tokens, scores = models.predict_batch(cfg, params, inputs, settings, max_decode_length=8)
    tokens = np.asarray(tokens)
    # Score what was produced, EOS included: the targets are the tokens up to and including the first EOS.
    # (a random model may emit the padding id 0, so the weights mark the positions, not targets > 0)
    targets = tokens.copy()
    ended = np.cumsum(targets == 1, axis=1)
    weights = ((ended == 0) | ((ended == 1) & (targets == 1))).astype(np.float32)
    decoder_inputs = np.concatenate([np.zeros((4, 1), np.int32), targets[:, :-1]], axis=1)
    batch = {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }
    np.testing.assert_allclose(models.score_batch(cfg, params, batch), scores, rtol=1e-5, atol=1e-5)


def test_decode_settings_refuse_contradictions():
    with pytest.raises(ValueError, match="choose beam search or sampling"):
        models.DecodeSettings(beam_size=4, temperature=1.0)
    with pytest.raises(ValueError, match="also give a temperature"):
        models.DecodeSettings(top_p=0.9)
    with pytest.raises(ValueError, match="beam_size=0"):
        models.DecodeSettings(beam_size=0)
    assert models.DecodeSettings(temperature=0.7).method == "sample"


def test_a_workdir_trained_with_cudnn_attention_evaluates_anywhere(trained, tmp_path):
    """The attention kernel is the training machine's speed choice: loading a workdir gives the einsum path."""
    workdir, _ = trained
    copy = str(tmp_path / "cudnn_run")
    shutil.copytree(workdir, copy)
    with open(f"{copy}/config.json", encoding="utf-8") as f:
        saved = json.load(f)
    saved["model"].update(attention_kernel="cudnn", dtype="bfloat16", dropout_rate=0.0)
    with open(f"{copy}/config.json", "w", encoding="utf-8") as f:
        json.dump(saved, f)
    loaded = evaluation.load_workdir(copy, task="synthetic_numbers")
    assert loaded.model_cfg.attention_kernel == "einsum" and loaded.model_cfg.dtype == "bfloat16"


def test_infer_and_evaluate_on_bad_input(trained, tmp_path):
    """Empty lines and a 1 MB line decode (the long one truncated, with a count); a line that is not UTF-8, a
    missing workdir or input file: one line naming what was wrong, exit status 2."""
    workdir, _ = trained
    common = ["--workdir", workdir, "--task", "synthetic_numbers", "--batch_size", "4"]
    lines = ["twenty one", "", "three", "   ", "seven " * 175_000, "forty two"]
    assert len(lines[4]) > 1_000_000
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = _run("t5x_lite.infer", *common, "--input", str(good))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(lines)  # one output per input, empty ones included
    assert "inputs longer than the task's 32 tokens:" in done.stderr and "1 of 6" in done.stderr

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("one\ntwo\ndrei Stra\u00dfen\nfour\n".encode("latin-1"))
    missing = str(tmp_path / "no_such_run")
    for module, args, message in [
        ("t5x_lite.infer", [*common, "--input", str(bad)], f"{bad}: line 3 is not valid UTF-8 (byte 9 of the line"),
        ("t5x_lite.infer", [*common, "--input", str(tmp_path / "none.txt")], "No such file or directory"),
        ("t5x_lite.infer", ["--workdir", missing], missing),
        ("t5x_lite.evaluate", ["--workdir", missing], missing),
    ]:
        done = _run(module, *args)
        # what a terminal shows: each line as its last carriage return left it (the progress bar clears itself)
        lines_out = [line.split("\r")[-1] for line in done.stderr.splitlines() if line.split("\r")[-1].strip()]
        assert done.returncode == 2 and len(lines_out) == 1, (module, args, done.stderr[-3000:])
        assert lines_out[0].startswith("error: ") and message in lines_out[0], lines_out
