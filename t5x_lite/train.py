"""Train a model from a config file: one readable loop, resumable, on whatever devices are there.

    python -m t5x_lite.train --config configs/demo.py --workdir /tmp/demo [--config.num_train_steps=500]

Writes WORKDIR/config.json, metrics.jsonl, tensorboard/, checkpoints/<step>/ (state, data-iterator state,
config), vocab/ and predictions/ (each evaluation's decoded examples; the final metrics are printed with three).
Started again with the same workdir, it resumes from the latest checkpoint on the exact next batch. SIGTERM/SIGINT
save the current step before exiting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from t5x_lite import (
    checkpoints,
    cli,
    compile_cache,
    config_files,
    fileio,
    flops,
    host_memory,
    lora,
    losses,
    metrics,
    models,
    network,
    optimizers,
    partitioning,
    trainer,
)
from t5x_lite.data import pipeline
from t5x_lite.data.tasks import Mixture, Task, TaskRegistry, task_vocabulary
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
    """The run's vocabulary: the one saved in the workdir when resuming; else that of ``vocab_task`` (a task or
    mixture whose vocabulary is trained and cached) or, fine-tuning, the ``init_from`` checkpoint's; else the
    task's own. Fine-tuning with a vocabulary other than the checkpoint's is refused: its token ids mean nothing
    to the pre-trained embeddings."""
    saved = fileio.workdir_path(workdir) / "vocab"
    if saved.is_dir():
        return Vocabulary.load(saved)
    if config.get("init_from") and not fileio.workdir_path(config.init_from).is_dir():
        raise FileNotFoundError(
            f"init_from={config.init_from!r} is not a directory: train or convert that checkpoint first (for the "
            "local fine-tuning configs: python -m t5x_lite.train --config configs/pretrain_local.py --workdir "
            f"{config.init_from}), or pass the right path"
        )
    init_vocab_dir = fileio.workdir_path(config.init_from) / "vocab" if config.get("init_from") else None
    init_vocab = Vocabulary.load(init_vocab_dir) if init_vocab_dir and init_vocab_dir.is_dir() else None
    vocab_task = config.get("vocab_task", "")
    vocab_size = config.get("vocab_size", 0)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 0:
        raise ValueError(f"config.vocab_size={vocab_size!r} must be a whole number of pieces >= 0 (0: the task's own)")
    if init_vocab is not None and not vocab_task:
        pieces = init_vocab.vocab_size - init_vocab.extra_ids
        if vocab_size and vocab_size != pieces:
            raise ValueError(
                f"config.vocab_size={vocab_size}, but init_from={config.init_from!r} brings its own vocabulary "
                f"({pieces} pieces) that its embeddings were trained with: drop vocab_size"
            )
        return init_vocab
    source = TaskRegistry.get(vocab_task) if vocab_task else task
    vocab = task_vocabulary(
        source,
        cache_dir=config.vocab_cache_dir or None,
        data_dir=config.data_dir or None,
        vocab_size=vocab_size or None,
    )
    if init_vocab is not None and vocab.fingerprint != init_vocab.fingerprint:
        raise ValueError(
            f"vocab_task={vocab_task!r} gives a vocabulary ({vocab.vocab_size} ids, {vocab.fingerprint[:12]}) that "
            f"differs from the one init_from={config.init_from!r} was trained with ({init_vocab.vocab_size} ids, "
            f"{init_vocab.fingerprint[:12]}); drop vocab_task to use the checkpoint's vocabulary"
        )
    return vocab


def _teacher(config, vocab: Vocabulary, verbose: bool) -> tuple[trainer.Distillation | None, Any]:
    """The distillation settings and the teacher's parameters (``config.distill_teacher``), or ``(None, None)``."""
    teacher = config.get("distill_teacher", "")
    if not teacher:
        return None, None
    root = fileio.workdir_path(teacher)
    if not (root / "config.json").is_file() or not (root / "vocab").is_dir():
        raise FileNotFoundError(f"distill_teacher={teacher!r} is not a trained workdir (config.json and vocab/)")
    teacher_cfg = network.TransformerConfig.from_dict(json.loads((root / "config.json").read_text())["model"])
    if teacher_cfg.quantization:
        raise ValueError(f"distill_teacher={teacher!r} is quantized ({teacher_cfg.quantization}); use its float source")
    teacher_vocab = Vocabulary.load(root / "vocab")
    if teacher_vocab.fingerprint != vocab.fingerprint:
        raise ValueError(
            f"distill_teacher={teacher!r} has another vocabulary ({teacher_vocab.vocab_size} ids, "
            f"{teacher_vocab.fingerprint[:12]}) than this run ({vocab.vocab_size} ids, {vocab.fingerprint[:12]}): "
            "its token distributions mean nothing here; train the student on the teacher's task or vocab_task"
        )
    distillation = trainer.Distillation(
        teacher_cfg.replace(attention_kernel="einsum"), config.distill_temperature, config.distill_weight
    )
    losses.check_distillation(distillation.temperature, distillation.weight)
    params = checkpoints.load_params(teacher)
    network.check_params_match(teacher_cfg, params, source=f"the checkpoint in distill_teacher={teacher}")
    if verbose:
        print(
            f"distilling from {teacher} ({network.count_params(teacher_cfg):,} parameters), temperature "
            f"{distillation.temperature}, weight {distillation.weight}"
            + ("; the loss uses whole logits (loss_chunk_tokens ignored)" if config.get("loss_chunk_tokens") else "")
        )
    return distillation, params


model_config = config_files.model_config  # the run's model for a vocabulary size (benchmarks mirror it too)


def _relative_lr(config, key: str, applies: bool, needs: str) -> float:
    """``config[key]`` (a peak learning rate; 0: the adapters') over the adapters' ``learning_rate``, checked:
    a non-negative number, set only where ``applies`` (else the error says it ``needs``)."""
    value = config.get(key, 0.0)
    if not isinstance(value, int | float) or value < 0 or (value and not applies):
        raise ValueError(
            f"{key}={value!r} must be a non-negative number (0: the learning rate of the adapters), and {needs}"
        )
    return float(value) / float(config.learning_rate) if value else 1.0


def _adapter_lr_scales(config, lora_rank: int) -> tuple[float, float]:
    """Checks ``lora_rows``, ``lora_rows_lr`` and ``lora_b_lr``; returns the learning rates of the trainable
    token-table rows and of the adapters' B factors over the adapters' (each 0 in the config: the adapters')."""
    count = config.get("lora_rows", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or (count and not lora_rank):
        raise ValueError(
            f"lora_rows={count!r} must be a non-negative integer, with model_overrides.lora_rank > 0 (it adds "
            "trainable token-table rows to LoRA adapters)"
        )
    rows = _relative_lr(
        config, "lora_rows_lr", count > 0, "needs lora_rows > 0 (the trainable token-table rows it applies to)"
    )
    b = _relative_lr(
        config,
        "lora_b_lr",
        lora_rank > 0,
        "needs model_overrides.lora_rank > 0 (the LoRA adapters whose B factors it applies to)",
    )
    return rows, b


def _eval_task(config, task: Task | Mixture) -> Task:
    """The task evaluated during training: ``eval_task`` when set (a mixture has to name one), else the task."""
    name = config.get("eval_task", "")
    chosen = TaskRegistry.get(name) if name else task
    if isinstance(chosen, Mixture):
        raise ValueError(
            f"{chosen.name!r} is a mixture, which has no single eval split; set --config.eval_task to one task, "
            f"e.g. one of {', '.join(chosen.rates)}"
        )
    if config.eval_split not in chosen.splits:
        raise ValueError(
            f"eval_split={config.eval_split!r} is not a split of task {chosen.name!r} "
            f"(it has {', '.join(chosen.splits)})"
        )
    return chosen


PREDICTIONS_DIR = "predictions"  # WORKDIR/predictions/<split>_step<N>.jsonl: every decoded eval example


def evaluate(
    config, task, vocab, model_cfg, state, eval_fn, mesh, rules, predictions_path: str | None = None
) -> dict[str, float]:
    """Loss over the eval split and, for tasks with metrics, decoding of it scored by them (``eval/bleu``, ...);
    with ``predictions_path``, process 0 writes every example's input, prediction and references there."""
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
    if predictions_path and result.predictions and jax.process_index() == 0:
        lines = []
        for prediction, record in zip(result.predictions, result.records, strict=True):
            row = {"inputs": record["inputs"], "prediction": prediction, "references": record["references"]}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        path = fileio.workdir_path(predictions_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_bytes_atomic(path, "".join(lines).encode("utf-8"))
    return {f"eval/{name}": value for name, value in result.metrics.items()}


def _predictions_path(workdir: str, config, step: int) -> str:
    return os.path.join(workdir, PREDICTIONS_DIR, f"{config.eval_split}_step{step}.jsonl")


def show_examples(workdir: str, count: int) -> str:
    """The first ``count`` examples of the latest evaluation's predictions file, for the console."""
    folder = fileio.workdir_path(workdir) / PREDICTIONS_DIR
    files = [path.name for path in folder.iterdir() if path.name.endswith(".jsonl")] if folder.is_dir() else []
    if not files or count <= 0:
        return ""
    latest = max(files, key=lambda name: int(name.rsplit("_step", 1)[-1].split(".")[0]))
    with (folder / latest).open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(count), f, strict=False)]
    lines = [f"{len(rows)} examples of {latest}:"]
    for row in rows:
        lines += [f"  input:      {row['inputs']}", f"  prediction: {row['prediction']}"]
        lines += [f"  reference:  {' | '.join(row['references'])}", ""]
    return "\n".join(lines).rstrip()


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Run ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last eval metrics."""
    launched = time.time()
    # ------------------------------------------------------------------------------------------- setup
    host_memory.keep_freed_memory(config.get("keep_freed_memory", False))  # XLA:CPU's buffers reused (opt-in)
    compile_cache.enable(config.get("compilation_cache_dir", ""))
    fileio.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    task = TaskRegistry.get(config.task)
    eval_task = _eval_task(config, task)
    # a bad model name, override or lora_rows setting fails now, not after minutes of vocabulary training
    rows_scale, b_scale = _adapter_lr_scales(config, model_config(config, 128).lora_rank)
    vocab = _vocabulary(config, task, workdir)
    model_cfg = model_config(config, vocab.vocab_size)
    if config.get("lora_rows", 0):  # the fine-tuning data's most frequent target tokens get trainable table rows
        rows = pipeline.most_frequent_tokens(task, vocab, config.lora_rows, data_dir=config.data_dir or None)
        model_cfg = model_cfg.replace(lora_rows=rows)
    if model_cfg.lora_rank and config.init_from:  # recorded absolute: the adapters-only checkpoints need the base
        config.init_from = str(fileio.workdir_path(config.init_from))
    if model_cfg.quantization and not model_cfg.lora_rank:
        raise ValueError(
            f"model quantization={model_cfg.quantization!r} is post-training only: train in float, then run "
            "python -m t5x_lite.quantize --workdir W --out W_Q; or train with --config.quantization (quantization-"
            "aware training), or add lora_rank > 0 for LoRA adapters on the quantized base (QLoRA)"
        )
    if config.pack and model_cfg.attention_kernel != "einsum":
        raise ValueError(
            f"model attention_kernel={model_cfg.attention_kernel!r} takes padded batches only, and pack=True packs "
            "them; set --config.pack=False or --config.model_overrides.attention_kernel=einsum"
        )
    mesh, rules = partitioning.make_mesh(tuple(config.mesh_shape)), config.partitioning
    batch_tokens = config.get("batch_tokens", 0)
    # Bucketed batches have as many rows as fit batch_tokens, always a multiple of row_multiple.
    row_multiple = math.lcm(config.get("bucket_row_multiple", 8), partitioning.batch_shards(mesh, rules))
    partitioning.validate(model_cfg, mesh, row_multiple if batch_tokens else config.batch_size, rules)
    optimizer = optimizers.make_optimizer(config, logical_axes=network.param_logical_axes(model_cfg))
    if model_cfg.lora_rank:  # LoRA: the adapters train, the base weights stay as loaded and hold no optimizer state
        optimizer = lora.adapters_only(optimizer, rows_scale, b_scale)
    schedule = optimizers.make_schedule(config)
    is_chief = jax.process_index() == 0
    distillation, teacher_params = _teacher(config, vocab, is_chief)
    if is_chief:
        resolved = {"config": config.to_dict(), "model": model_cfg.to_dict()}
        (fileio.workdir_path(workdir) / "config.json").write_text(json.dumps(resolved, indent=2, default=str))

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
    plan = None
    if batch_tokens:
        plan = pipeline.bucket_plan(
            task,
            vocab,
            batch_tokens=batch_tokens,
            boundaries=tuple(config.get("bucket_boundaries", ()) or ()),
            row_multiple=row_multiple,
            seed=config.seed,
            data_dir=config.data_dir or None,
        )
        if is_chief:
            print(
                f"length-bucketed batches of <= {batch_tokens} tokens: {plan.batches_per_epoch} per epoch, "
                f"{100 * plan.padding_fraction():.1f}% padding, shapes (rows, length) {plan.shapes()}",
                flush=True,
            )
    train_data = pipeline.train_dataset(
        task,
        vocab,
        batch_size=config.batch_size,
        seed=config.seed,
        pack=config.pack,
        shard=pipeline.ProcessShard.from_jax(),
        data_dir=config.data_dir or None,
        prefetch=config.get("prefetch_batches", 2),
        batch_tokens=batch_tokens,
        row_multiple=row_multiple,
        plan=plan,
    )
    shardings = trainer.state_shardings(model_cfg, optimizer, mesh, rules)
    latest = checkpointer.latest_step()
    stopper = EarlyStopping(config.best_metric, config.best_mode, config.get("early_stopping_patience", 0))
    # LoRA on an init_from base: checkpoints hold the adapters only (and the optimizer state, which is theirs);
    # resume and checkpoints.load_params read the base back from init_from
    adapter_checkpoints = bool(model_cfg.lora_rank and config.init_from)

    def saved(tree: trainer.TrainState) -> trainer.TrainState:
        return tree.replace(params=lora.adapters_of(tree.params)) if adapter_checkpoints else tree

    resumed = None
    if latest is not None:  # the newest step that reads back intact; damaged newer ones are moved aside, warned of
        abstract = jax.eval_shape(lambda key: trainer.create_train_state(model_cfg, optimizer, key), jax.random.key(0))
        resumed = checkpointer.restore_latest_good(abstract_state=saved(abstract), shardings=saved(shardings))
    if resumed is not None:
        latest, (state, data_state, _) = resumed
        if adapter_checkpoints:
            base = network.lora_base_params(model_cfg, checkpoints.load_params(config.init_from), config.init_from)
            params = lora.with_adapters(base, state.params)
            state = state.replace(params=jax.device_put(params, shardings.params))
        data_state = dict(data_state)
        stopper.load(data_state.pop(EarlyStopping.STATE_KEY, None))
        iterator = pipeline.restore_iterator(train_data, data_state)
        if is_chief:
            print(f"resuming from step {latest} in {workdir}", flush=True)
    else:
        state = trainer.create_train_state(model_cfg, optimizer, jax.random.key(config.seed), mesh, rules)
        if config.init_from:
            params = checkpoints.load_params(config.init_from)
            source = f"the checkpoint in {config.init_from}"
            if model_cfg.lora_rank and not lora.holds_adapters(params):  # a base model: adapters start fresh
                params = network.lora_base_params(model_cfg, params, source)
                params = lora.insert_base(state.params, params)
            else:
                network.check_params_match(model_cfg, params, source=source)
            state = state.replace(params=jax.device_put(params, shardings.params))
        iterator = iter(train_data)
    start_step = int(state.step)
    end_step = start_step if stopper.should_stop else config.num_train_steps  # an early-stopped run stays stopped

    # ------------------------------------------------------------------------------------------- train loop
    loss_chunk_tokens = config.get("loss_chunk_tokens", 0)
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
        loss_chunk_tokens=loss_chunk_tokens,
        distillation=distillation,
        teacher_params=teacher_params,
    )
    if plan is not None and start_step < end_step:
        started = time.perf_counter()
        shapes = pipeline.bucket_batch_shapes(plan, task.lengths)
        train_step = trainer.precompile_train_step(train_step, state, shapes, mesh, rules)
        if is_chief:
            print(f"compiled the train step for {len(shapes)} batch shapes in {time.perf_counter() - started:.0f} s")
    eval_fn = trainer.compile_eval_step(model_cfg, mesh, rules, loss_chunk_tokens=loss_chunk_tokens)
    peak_flops, peak_source = flops.peak_flops_per_device()
    if is_chief:
        print(f"peak {peak_flops:.3g} FLOP/s per device ({peak_source})")
    writer = metrics.MetricWriter(workdir, enabled=is_chief)
    writer.rewind(start_step)  # rows a killed run logged after its last checkpoint are superseded
    writer.write(start_step, {"perf/launched": launched})  # when this command started (wall-clock curves)
    preemption = checkpoints.PreemptionSync()  # every process stops at the same step (multi-process: jax's service)
    rng = jax.random.key(config.seed)
    last_eval: dict[str, float] = {}
    progress = _progress(start_step, config.num_train_steps, enabled=is_chief)
    window = _Window()
    profile = tuple(config.get("profile_steps", ()) or ())  # (first, last) step of a jax.profiler trace
    crash_after = config.get("debug_crash_after_step", 0)  # fault injection for tests: SIGKILL after that save
    skip_nonfinite = config.get("skip_nonfinite_updates", False)
    keep_best = config.get("keep_best_checkpoints", 0) > 0
    try:
        with partitioning.activate(mesh, rules):
            for step in range(start_step, end_step):
                batch = next(iterator)
                window.add(batch, model_cfg)
                if profile and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                state, step_metrics = train_step(state, partitioning.host_local_to_global(batch, mesh, rules), rng)
                done = step + 1
                if done % config.log_every_steps == 0 or done == config.num_train_steps:
                    values = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
                    if not math.isfinite(values["train/loss"]) and not skip_nonfinite:
                        raise _nonfinite(values["train/loss"], done, checkpointer, workdir)
                    values.update(window.values(peak_flops))
                    writer.write(done, values)
                    progress.set_postfix(loss=f"{values['train/loss']:.3f}")
                    window = _Window()
                if profile and done == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                evaluated = done % config.eval_every_steps == 0 or done == config.num_train_steps
                if evaluated:
                    path = _predictions_path(workdir, config, done)
                    last_eval = evaluate(config, eval_task, vocab, model_cfg, state, eval_fn, mesh, rules, path)
                    stopper.update(last_eval)
                    writer.write(done, {**last_eval, **stopper.values(), "perf/wall_time": time.time()})
                    logging.info("step %d: %s", done, last_eval)
                    window = _Window()  # the next throughput figure leaves the evaluation out
                stop = evaluated and stopper.should_stop
                preempted = preemption.should_stop(done)  # the same step on every process
                saving = done % config.checkpoint_every_steps == 0 or done == config.num_train_steps
                if saving and not skip_nonfinite and not math.isfinite(float(step_metrics["loss"])):
                    raise _nonfinite(float(step_metrics["loss"]), done, checkpointer, workdir)  # never save NaNs
                checkpointer.maybe_save(
                    done,
                    saved(state),
                    {**pipeline.iterator_state(iterator), EarlyStopping.STATE_KEY: stopper.state()},
                    metrics=last_eval if evaluated else None,
                    force=done == config.num_train_steps or preempted or stop or (evaluated and keep_best),
                )
                progress.update(1)
                if crash_after and done == crash_after:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if preempted:
                    checkpointer.wait()
                    print(f"preemption: saved step {done} (process {jax.process_index()}), exiting", file=sys.stderr)
                    break
                if stop:
                    if is_chief:
                        print(stopper.message(done), flush=True)
                    break
        if not last_eval and start_step >= end_step:  # already trained (or stopped early): report the model
            last_eval = evaluate(config, eval_task, vocab, model_cfg, state, eval_fn, mesh, rules)
    finally:
        progress.close()
        # Stop grain's prefetch thread now. Left running into interpreter exit (an error path: a full disk), the daemon
        # thread is torn down inside SentencePiece's C++ and the process aborts (SIGABRT) after printing the error.
        iterator.close()
        try:
            checkpointer.close()  # waits for the last save; raises a failed save's error after releasing orbax
        finally:
            preemption.uninstall()
            writer.close()
    return last_eval


class _Window:
    """Throughput since the last log: steps, wall time, real target tokens, model FLOPs, a data fingerprint."""

    def __init__(self) -> None:
        self.start, self.steps, self.tokens, self.flops, self.fingerprint = time.perf_counter(), 0, 0, 0.0, 0

    def add(self, batch: dict[str, np.ndarray], model_cfg: network.TransformerConfig) -> None:
        targets = batch["decoder_target_tokens"]
        self.steps += 1
        self.tokens += int(np.sum(targets > 0))
        rows, input_length = batch["encoder_input_tokens"].shape
        self.flops += flops.train_flops(model_cfg, rows, input_length, targets.shape[1]) * jax.process_count()
        self.fingerprint = zlib.crc32(np.ascontiguousarray(targets), self.fingerprint)

    def values(self, peak_flops: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {
            "perf/step_time": elapsed / max(self.steps, 1),
            "perf/target_tokens_per_sec": self.tokens * jax.process_count() / elapsed,
            "perf/mfu": self.flops / (elapsed * peak_flops * jax.device_count()),
            "data/fingerprint": float(self.fingerprint),  # crc32 of the targets seen since the last log
            "perf/wall_time": time.time(),  # seconds since the epoch: learning curves against wall-clock time
        }


class EarlyStopping:
    """fairseq's ``--patience``: stop when ``metric`` has not improved for ``patience`` evaluations in a row
    (0: never). Its state travels in the checkpoint, so a resumed run counts on exactly."""

    STATE_KEY = "t5x_lite_early_stopping"

    def __init__(self, metric: str, mode: str, patience: int) -> None:
        if patience < 0:
            raise ValueError(f"early_stopping_patience={patience} must be >= 0 (0 turns early stopping off)")
        self.metric, self.mode, self.patience = metric, mode, int(patience)
        self.best: float | None = None
        self.evals_without_improvement = 0

    def update(self, eval_metrics: dict[str, float]) -> None:
        if self.metric not in eval_metrics:
            if self.patience:
                raise ValueError(
                    f"early_stopping_patience needs best_metric={self.metric!r} from every evaluation, which gave "
                    f"{sorted(eval_metrics)}; set best_metric to one of them"
                )
            return
        value = float(eval_metrics[self.metric])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.evals_without_improvement = value, 0
        else:
            self.evals_without_improvement += 1

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def values(self) -> dict[str, float]:
        if self.best is None:
            return {}
        return {
            f"{self.metric}_best": self.best,
            "eval/evals_without_improvement": float(self.evals_without_improvement),
        }

    def message(self, step: int) -> str:
        return (
            f"early stopping at step {step}: {self.metric} has not improved on {self.best:.4g} for "
            f"{self.evals_without_improvement} evaluations (early_stopping_patience={self.patience})"
        )

    def state(self) -> dict[str, float | int | None]:
        return {"best": self.best, "evals_without_improvement": self.evals_without_improvement}

    def load(self, state: dict | None) -> None:
        if state:
            self.best = state.get("best")
            self.evals_without_improvement = int(state.get("evals_without_improvement", 0))


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
    host_memory.keep_freed_memory(config.get("keep_freed_memory", False))  # before a distributed run starts threads
    partitioning.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        final = train_and_evaluate(config, workdir)
    except (TrainingError, checkpoints.DiskFullError) as error:  # bad input (ValueError, ...): cli.run's to report
        cli.fail(str(error))
    if final:
        print("final evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
        if jax.process_index() == 0 and config.get("show_examples", 3):
            print(show_examples(workdir, config.get("show_examples", 3)))


def _cli() -> None:
    jax.config.parse_flags_with_absl()
    # Collectives between processes' CPU devices (multi-process CPU runs); no effect on GPU/TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    cli.run(main, keep_freed_memory=False)  # main applies config.keep_freed_memory


if __name__ == "__main__":
    _cli()
