"""Train a model from a config file: one readable loop, resumable, on whatever devices are there.

    python -m t5x_lite.train --config configs/demo.py --workdir /tmp/demo [--config.num_train_steps=500]

Writes WORKDIR/config.json, metrics.jsonl, tensorboard/, checkpoints/<step>/ (state, data-iterator state,
config) and vocab/. Started again with the same workdir, it resumes from the latest checkpoint on the exact
next batch. SIGTERM/SIGINT save the current step before exiting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import zlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs.common import get_model_config
from t5x_lite import checkpoints, flops, metrics, models, network, optimizers, partitioning, trainer
from t5x_lite.data import pipeline
from t5x_lite.data.tasks import TaskRegistry, task_vocabulary
from t5x_lite.data.vocab import Vocabulary
from t5x_lite.evaluation import evaluate_split

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the vocabulary.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad config); the message says what and the last checkpoint."""


def _vocabulary(config, task, workdir: str) -> Vocabulary:
    """The run's vocabulary: the one saved in the workdir when resuming, else the task's (trained and cached)."""
    saved = os.path.join(workdir, "vocab")
    if os.path.isdir(saved):
        return Vocabulary.load(saved)
    return task_vocabulary(task, cache_dir=config.vocab_cache_dir or None, data_dir=config.data_dir or None)


def _model_config(config, vocab: Vocabulary) -> network.TransformerConfig:
    padded_vocab = -(-vocab.vocab_size // 128) * 128  # embedding rows in multiples of 128, as T5 does
    return get_model_config(config.model, vocab_size=padded_vocab, **dict(config.model_overrides))


def evaluate(config, task, vocab, model_cfg, state, eval_fn, mesh, rules) -> dict[str, float]:
    """Loss over the eval split and, for tasks with metrics, decoding of it scored by them (``eval/bleu``, ...)."""
    settings = models.DecodeSettings(
        beam_size=config.get("eval_beam_size", 1),
        alpha=config.get("eval_alpha", 0.6),
        max_decode_length=config.get("eval_max_decode_length", 0),
    )
    result = evaluate_split(
        task,
        vocab,
        model_cfg,
        state.params,
        split=config.eval_split,
        settings=settings,
        batch_size=config.eval_batch_size,
        mesh=mesh,
        rules=rules,
        max_examples=config.eval_examples,
        data_dir=config.data_dir or None,
        eval_fn=eval_fn,
        decode=bool(task.metrics),
    )
    return {f"eval/{name}": value for name, value in result.metrics.items()}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Run ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last eval metrics."""
    # ------------------------------------------------------------------------------------------- setup
    os.makedirs(workdir, exist_ok=True)
    task = TaskRegistry.get(config.task)
    vocab = _vocabulary(config, task, workdir)
    model_cfg = _model_config(config, vocab)
    if config.pack and model_cfg.attention_kernel != "einsum":
        raise ValueError(
            f"model attention_kernel={model_cfg.attention_kernel!r} takes padded batches only, and pack=True packs "
            "them; set --config.pack=False or --config.model_overrides.attention_kernel=einsum"
        )
    mesh, rules = partitioning.make_mesh(tuple(config.mesh_shape)), config.partitioning
    partitioning.validate(model_cfg, mesh, config.batch_size, rules)
    optimizer = optimizers.make_optimizer(config)
    schedule = optimizers.make_schedule(config)
    is_chief = jax.process_index() == 0
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config.to_dict(), "model": model_cfg.to_dict()}, f, indent=2, default=str)

    # ------------------------------------------------------------------------------------------- state and data
    checkpointer = checkpoints.Checkpointer(
        workdir,
        save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
        keep_best=config.get("keep_best_checkpoints", 0),
        best_metric=config.get("best_metric", "eval/loss"),
        best_mode=config.get("best_mode", "min"),
        config=config.to_dict(),
    )
    checkpointer.save_vocabulary(vocab)
    train_data = pipeline.train_dataset(
        task,
        vocab,
        batch_size=config.batch_size,
        seed=config.seed,
        pack=config.pack,
        shard=pipeline.ProcessShard.from_jax(),
        data_dir=config.data_dir or None,
        prefetch=config.get("prefetch_batches", 2),
    )
    shardings = trainer.state_shardings(model_cfg, optimizer, mesh, rules)
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(lambda key: trainer.create_train_state(model_cfg, optimizer, key), jax.random.key(0))
        state, data_state, _ = checkpointer.restore(latest, abstract_state=abstract, shardings=shardings)
        iterator = pipeline.restore_iterator(train_data, data_state)
        if is_chief:
            print(f"resuming from step {latest} in {workdir}", flush=True)
    else:
        state = trainer.create_train_state(model_cfg, optimizer, jax.random.key(config.seed), mesh, rules)
        if config.init_from:
            params = checkpoints.load_params(config.init_from)
            network.check_params_match(model_cfg, params, source=f"the checkpoint in {config.init_from}")
            state = state.replace(params=jax.device_put(params, shardings.params))
        iterator = iter(train_data)
    start_step = int(state.step)

    # ------------------------------------------------------------------------------------------- train loop
    train_step = trainer.compile_train_step(
        model_cfg,
        optimizer,
        mesh,
        rules,
        num_microbatches=config.num_microbatches,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
        schedule=schedule,
        skip_nonfinite=config.get("skip_nonfinite_updates", False),
    )
    eval_fn = trainer.compile_eval_step(model_cfg, mesh, rules)
    lengths = task.tasks()[0].lengths if hasattr(task, "tasks") else task.lengths
    step_flops = flops.train_flops(model_cfg, config.batch_size, lengths["inputs"], lengths["targets"])
    peak_flops, peak_source = flops.peak_flops_per_device()
    if is_chief:
        print(f"model FLOPs per step {step_flops:.3g}; peak {peak_flops:.3g} FLOP/s per device ({peak_source})")
    writer = metrics.MetricWriter(workdir, enabled=is_chief)
    preemption = checkpoints.install_preemption_handler()
    rng = jax.random.key(config.seed)
    last_eval: dict[str, float] = {}
    progress = _progress(start_step, config.num_train_steps, enabled=is_chief)
    window_start, window_steps, window_tokens, window_fingerprint = time.perf_counter(), 0, 0, 0
    profile = tuple(config.get("profile_steps", ()) or ())  # (first, last) step of a jax.profiler trace
    crash_after = config.get("debug_crash_after_step", 0)
    skip_nonfinite = config.get("skip_nonfinite_updates", False)  # fault injection for tests: SIGKILL after that save
    try:
        with partitioning.activate(mesh, rules):
            for step in range(start_step, config.num_train_steps):
                batch = next(iterator)
                window_tokens += int(np.sum(batch["decoder_target_tokens"] > 0))
                window_fingerprint = zlib.crc32(
                    np.ascontiguousarray(batch["decoder_target_tokens"]), window_fingerprint
                )
                if profile and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                state, step_metrics = train_step(state, partitioning.host_local_to_global(batch, mesh, rules), rng)
                window_steps += 1
                done = step + 1
                if done % config.log_every_steps == 0 or done == config.num_train_steps:
                    values = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
                    if not math.isfinite(values["train/loss"]) and not skip_nonfinite:
                        raise _nonfinite(values["train/loss"], done, checkpointer, workdir)
                    elapsed = time.perf_counter() - window_start
                    values["perf/step_time"] = elapsed / window_steps
                    values["perf/target_tokens_per_sec"] = window_tokens * jax.process_count() / elapsed
                    values["perf/mfu"] = step_flops / (values["perf/step_time"] * peak_flops * jax.device_count())
                    values["data/fingerprint"] = float(
                        window_fingerprint
                    )  # crc32 of the targets seen since the last log
                    writer.write(done, values)
                    progress.set_postfix(loss=f"{values['train/loss']:.3f}")
                    window_start, window_steps, window_tokens, window_fingerprint = time.perf_counter(), 0, 0, 0
                if profile and done == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                if done % config.eval_every_steps == 0 or done == config.num_train_steps:
                    last_eval = evaluate(config, task, vocab, model_cfg, state, eval_fn, mesh, rules)
                    writer.write(done, last_eval)
                    logging.info("step %d: %s", done, last_eval)
                saving = done % config.checkpoint_every_steps == 0 or done == config.num_train_steps
                if saving and not skip_nonfinite and not math.isfinite(float(step_metrics["loss"])):
                    raise _nonfinite(float(step_metrics["loss"]), done, checkpointer, workdir)  # never save NaNs
                checkpointer.maybe_save(
                    done,
                    state,
                    pipeline.iterator_state(iterator),
                    metrics=last_eval or None,
                    force=done == config.num_train_steps or preemption.requested,
                )
                progress.update(1)
                if crash_after and done == crash_after:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if preemption.requested:
                    logging.warning("preemption signal: saved step %d, exiting", done)
                    break
        if not last_eval and start_step >= config.num_train_steps:  # already trained: report the final model
            last_eval = evaluate(config, task, vocab, model_cfg, state, eval_fn, mesh, rules)
    finally:
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        preemption.uninstall()
        writer.close()
    return last_eval


def _nonfinite(loss: float, step: int, checkpointer: checkpoints.Checkpointer, workdir: str) -> TrainingError:
    checkpointer.wait()
    latest = checkpointer.latest_step()
    kept = f"the last good checkpoint is step {latest} in {workdir}" if latest else "no checkpoint was saved yet"
    return TrainingError(
        f"non-finite loss {loss} at step {step}; {kept} (lower learning_rate, set grad_clip_norm, "
        "or set skip_nonfinite_updates=True to drop such updates)"
    )


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO: keep the console readable
        logging.set_verbosity(logging.WARNING)
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or not workdir:
        raise app.UsageError("pass --config configs/X.py and --workdir DIR")
    partitioning.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        final = train_and_evaluate(config, workdir)
    except (TrainingError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if final:
        print("final evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))


def _cli() -> None:
    jax.config.parse_flags_with_absl()
    # Collectives between processes' CPU devices (multi-process CPU runs); no effect on GPU/TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    app.run(main)


if __name__ == "__main__":
    _cli()
