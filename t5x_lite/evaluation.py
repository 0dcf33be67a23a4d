"""Evaluation shared by ``t5x_lite.train`` (periodic eval), ``t5x_lite.evaluate`` and ``t5x_lite.infer``: decode a
split and score it with the task's metrics; load a workdir's parameters (one checkpoint or an average).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from t5x_lite import checkpoints, fileio, metrics, models, partitioning
from t5x_lite.data import pipeline
from t5x_lite.data.tasks import TaskRegistry
from t5x_lite.data.vocab import Vocabulary
from t5x_lite.network import TransformerConfig


@dataclasses.dataclass
class EvalResult:
    """Metrics without prefix (``loss``, ``bleu``, ...), sacreBLEU signatures, and the decoded texts in order."""

    metrics: dict[str, float]
    signatures: dict[str, str]
    predictions: list[str]
    records: list[dict[str, Any]]


def target_language(task) -> str | None:
    """The target language code of a translation task (for Moses tokenization), else None."""
    return dict(task.source_options).get("tgt_lang")


def evaluate_split(
    task,
    vocab: Vocabulary,
    model_cfg: TransformerConfig,
    params: Any,
    *,
    split: str,
    settings: models.DecodeSettings,
    batch_size: int,
    mesh,
    rules,
    max_examples: int = 0,
    data_dir: str | None = None,
    eval_fn=None,
    decode: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Loss (when ``eval_fn`` is given) and decoding of the first ``max_examples`` (0: all) examples of ``split``,
    scored with the task's metrics. Every process decodes its rows; all processes see every prediction."""
    dataset = pipeline.eval_dataset(
        task, vocab, split, batch_size=batch_size, data_dir=data_dir, shard=pipeline.ProcessShard.from_jax()
    )
    source = task.get_source(split, data_dir=data_dir)
    limit = min(max_examples or len(source), len(source))
    sums = {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}
    predictions: list[str] = []
    records: list[dict[str, Any]] = []
    bar = _progress_bar(limit, f"decode {split}", enabled=progress and decode)
    for index, batch in enumerate(dataset):
        if index * batch_size >= limit:  # global batch i holds examples i*batch_size ... in every process
            break
        ids, mask = batch.pop("example_id"), batch.pop("example_mask")
        global_batch = partitioning.host_local_to_global(batch, mesh, rules)
        if eval_fn is not None:
            out = eval_fn(params, global_batch)
            for key in sums:
                sums[key] += float(out[key])
        if not decode:
            continue
        tokens, _ = models.predict_batch(
            model_cfg,
            params,
            global_batch["encoder_input_tokens"],
            settings,
            max_decode_length=task.lengths["targets"],
            vocab_limit=vocab.vocab_size,
            eos_id=vocab.eos_id,
        )
        # Every process gets every row (and its id), in process order, and scores the whole batch.
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
        ids, mask = (multihost_utils.process_allgather(np.asarray(x), tiled=True) for x in (ids, mask))
        before = len(records)
        for text, example_id, real in zip(vocab.decode_batch(np.asarray(tokens)), ids, mask, strict=True):
            if real and len(records) < limit:
                predictions.append(task.postprocess(text))
                records.append(source[int(example_id)])
        bar.update(len(records) - before)
    bar.close()
    result: dict[str, float] = {}
    if eval_fn is not None:
        result["loss"] = sums["loss_sum"] / max(sums["weight_sum"], 1.0)
        result["accuracy"] = 100.0 * sums["correct"] / max(sums["weight_sum"], 1.0)
    signatures: dict[str, str] = {}
    if decode and task.metrics:
        report = metrics.compute_metrics(
            task.metrics, predictions, records, target_lang=target_language(task), target_format=task.target_format
        )
        result.update(report.scores)
        signatures = dict(report.signatures)
    if decode:
        result["examples"] = float(len(predictions))
    return EvalResult(result, signatures, predictions, records)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="ex", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- loading a workdir


@dataclasses.dataclass
class LoadedModel:
    """Everything needed to decode with a training workdir."""

    config: dict[str, Any]  # the training config (config.json)
    model_cfg: TransformerConfig
    vocab: Vocabulary
    task: Any
    params: Any
    steps: list[int]  # the checkpoint step(s) the parameters come from


def load_workdir(
    workdir: str, *, checkpoint_step: int | None = None, average_last: int = 0, task: str | None = None
) -> LoadedModel:
    """The config, vocabulary, task and parameters (one checkpoint, or the average of the last N) of a workdir;
    ``task`` names another registered task to decode instead of the one trained on (same vocabulary)."""
    root = fileio.workdir_path(workdir)
    workdir = str(root)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: --workdir must be a t5x_lite.train workdir")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    # The attention kernel is a speed choice of the machine that trained (cuDNN needs an NVIDIA GPU), not part of
    # the model: evaluation and inference run the einsum path, which every backend has.
    model_cfg = TransformerConfig.from_dict(saved["model"]).replace(attention_kernel="einsum")
    vocab = Vocabulary.load(root / "vocab")
    task = TaskRegistry.get(task or saved["config"]["task"])
    if checkpoint_step is not None and average_last:
        raise ValueError("give --checkpoint_step or --average_last, not both")
    if average_last < 0:
        raise ValueError(f"--average_last={average_last} must be a positive number of checkpoints")
    if average_last > 1 and model_cfg.quantization:
        raise ValueError(
            f"{workdir} is quantized ({model_cfg.quantization}): average the float checkpoints before quantizing "
            "(python -m t5x_lite.quantize --average_last N)"
        )
    if average_last:
        steps = checkpoint_steps(workdir)
        if len(steps) < average_last:
            raise ValueError(
                f"--average_last={average_last} but {workdir} holds {len(steps)} checkpoint(s) (steps {steps}); "
                "average fewer, or keep more with config.keep_checkpoints"
            )
        steps = steps[-average_last:]
        trees = [checkpoints.load_params(workdir, step) for step in steps]
        params = trees[0] if len(trees) == 1 else average_params(trees)
    else:
        step = checkpoint_step if checkpoint_step is not None else (checkpoint_steps(workdir) or [None])[-1]
        params = checkpoints.load_params(workdir, step)
        steps = [step]
    return LoadedModel(saved["config"], model_cfg, vocab, task, params, steps)


def evaluate_loaded(
    loaded: LoadedModel,
    split: str,
    settings: models.DecodeSettings,
    batch_size: int,
    *,
    max_examples: int = 0,
    data_dir: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Decode and score ``split`` with a loaded workdir's parameters, data-parallel over every device
    (``batch_size`` rounded down to a multiple of the device count, at least one row each)."""
    mesh, rules = partitioning.make_mesh((-1, 1, 1)), "data_parallel"
    # data parallel: every parameter (float, quantized or adapter) replicated
    params = jax.device_put(loaded.params, NamedSharding(mesh, PartitionSpec()))
    with partitioning.activate(mesh, rules):
        return evaluate_split(
            loaded.task,
            loaded.vocab,
            loaded.model_cfg,
            params,
            split=split,
            settings=settings,
            batch_size=max(batch_size // jax.device_count(), 1) * jax.device_count(),
            mesh=mesh,
            rules=rules,
            max_examples=max_examples,
            data_dir=data_dir if data_dir is not None else (loaded.config.get("data_dir") or None),
            progress=progress,
        )


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in ``workdir``, oldest first."""
    checkpointer = checkpoints.Checkpointer(workdir, save_every_steps=1, async_save=False, read_only=True)
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def average_params(trees: Sequence[Any]) -> Any:
    """Element-wise mean of parameter trees of one structure (accumulated in float32, cast back)."""
    if not trees:
        raise ValueError("average_params needs at least one parameter tree")

    def mean(*leaves):
        total = sum(jnp.asarray(leaf, jnp.float32) for leaf in leaves)
        return (total / len(leaves)).astype(leaves[0].dtype)

    return jax.tree.map(mean, *trees)
