"""Experiment config files: the default train config they override, their ``path:options`` argument, and
loading one by path (with its optional ``sweep(add)``) so that the library never imports the ``configs`` folder.

A config file defines ``get_config(arg) -> ConfigDict``, its ``OPTIONS`` (what ``path:key=value`` may set) and may
define ``sweep(add)`` (or ``sweep(add, options)``, given the parsed options), which calls ``add(key=value, ...)``
once per point of a sweep; a key is one of the file's ``OPTIONS`` or a dotted config key (``learning_rate``,
``model_overrides.dropout_rate``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import os
import sys
import typing
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder


def parse_options(arg: str | None, defaults: dict[str, Any], config_file: str) -> dict[str, Any]:
    """``'steps=500,batch_size=32'`` -> ``defaults`` updated with typed values (big_vision style config args)."""
    options = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in options:
            raise ValueError(f"{config_file}: unknown option {key!r}; known: {', '.join(options)}")
        options[key] = _typed(value, defaults[key], f"{config_file}: option {key}")
    return options


def check_choice(options: dict[str, Any], key: str, choices, config_file: str) -> Any:
    """``options[key]`` when it is one of ``choices``; else a ValueError that names the config file and lists them."""
    value = options[key]
    if value not in choices:
        raise ValueError(f"{config_file}: {key}={value!r} is unknown; choose one of {', '.join(choices)}")
    return value


def _typed(value: str, default: Any, what: str) -> Any:
    """``value`` converted to the type of ``default`` (``'False'`` -> False, not ``bool('False')``)."""
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{what}={value!r} is not a boolean; write true or false")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a {type(default).__name__}") from None


def model_overrides(**given: Any) -> ml_collections.ConfigDict:
    """``config.model_overrides``: the ``given`` TransformerConfig fields, and every other field as an unset
    placeholder, so that ``--config.model_overrides.FIELD=V`` can set any field (ml_collections refuses a key
    that a config does not have). Unset fields keep the model preset's value (``given_model_overrides``)."""
    from t5x_lite.network import TransformerConfig

    fields = {field.name: field for field in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"model_overrides: {unknown} are not TransformerConfig fields; known: {sorted(fields)}")
    hints = typing.get_type_hints(TransformerConfig)
    values: dict[str, Any] = {}
    for name in fields:
        if name in given:
            values[name] = given[name]
        else:  # `int | None` -> int: the type a command-line value is parsed as
            kinds = [kind for kind in typing.get_args(hints[name]) if kind is not type(None)] or [hints[name]]
            values[name] = placeholder(kinds[0])
    return ml_collections.ConfigDict(values)


def given_model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of ``config.model_overrides`` that are set (placeholders left unset are not overrides)."""
    return {key: value for key, value in config.model_overrides.items() if value is not None}


def model_config(config: ml_collections.ConfigDict, vocab_ids: int) -> Any:
    """The run's TransformerConfig: ``config.model``'s preset with its overrides (and ``config.quantization``:
    QLoRA with LoRA adapters, else quantization-aware training) for a vocabulary of ``vocab_ids`` ids, its
    embedding rows padded to a multiple of 128 unless ``model_overrides.vocab_size`` sets them."""
    from t5x_lite.presets import embedding_rows, get_model_config

    overrides = given_model_overrides(config)
    rows = overrides.pop("vocab_size", None) or embedding_rows(vocab_ids)
    if rows < vocab_ids:
        raise ValueError(
            f"model_overrides.vocab_size={rows} gives fewer embedding rows than the vocabulary's {vocab_ids} ids: "
            "raise it or drop it (the rows are then the vocabulary's, padded to a multiple of 128)"
        )
    if config.get("quantization"):
        overrides["quantization" if overrides.get("lora_rank") else "qat"] = config.quantization
    return get_model_config(config.model, vocab_size=rows, **overrides)


def default_train_config() -> ml_collections.ConfigDict:
    """Every key ``t5x_lite.train`` reads, with defaults; experiment configs override what they change."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "synthetic_numbers"
    config.data_dir = ""  # local corpora; empty: $T5X_LITE_DATA or ../shared/data
    config.vocab_cache_dir = ""  # empty: ~/.cache/t5x_lite/vocab
    config.vocab_task = ""  # use this task's (or mixture's) vocabulary, e.g. "local_pretrain"; empty: the task's own
    config.vocab_size = 0  # pieces of the vocabulary trained for this run (e.g. 10000); 0: the task's own size
    # glibc keeps freed memory for XLA:CPU's next step (t5x_lite/host_memory.py): a faster train step for
    # Transformer-tiny on Multi30k, a slower one for t5_small, so off unless a config measured it to help
    config.keep_freed_memory = False
    config.compilation_cache_dir = ""  # compiled programs kept for restarts; empty: ~/.cache/t5x_lite/xla; "none": off
    config.pack = True
    config.prefetch_batches = 2  # batches prepared ahead on a background thread
    # batch_tokens > 0: length-bucketed batches of at most that many padded tokens (fairseq's --max-tokens)
    # instead of batch_size rows of the task's full length; needs pack=False and a seq2seq task.
    config.batch_tokens = 0
    config.bucket_boundaries = ()  # padded lengths of the buckets; empty: bucketing.default_boundaries
    config.bucket_row_multiple = 8  # rows of every bucketed batch are a multiple of this (and of the batch shards)

    # Quantization-aware training: "" or a t5x_lite.quantization scheme (int8, int8_dynamic, fp8); the same as
    # model_overrides.qat. The trained workdir converts with python -m t5x_lite.quantize --scheme the same.
    # With model_overrides.lora_rank > 0 it is QLoRA instead: the frozen base held quantized, float adapters.
    config.quantization = ""
    # LoRA (model_overrides.lora_rank > 0): besides the adapters, train a full change of the token-table rows of
    # the fine-tuning data's ``lora_rows`` most frequent target tokens (model_overrides.lora_rows, chosen at start)
    config.lora_rows = 0
    config.lora_rows_lr = 0.0  # their peak learning rate (same schedule); 0: the adapters' learning_rate
    # LoRA+ (Hayou et al. 2024): the peak learning rate of the adapters' B factors (A keeps learning_rate); 0: the same
    config.lora_b_lr = 0.0
    # Unstructured magnitude pruning while training (t5x_lite.sparsity): the fraction of every dense kernel's
    # entries set to zero rises as a cubic from prune_start_step to prune_end_step (Zhu & Gupta 2017); 0: off.
    config.prune_sparsity = 0.0
    config.prune_start_step = 0
    config.prune_end_step = 0
    config.model = "t5_tiny"
    config.model_overrides = model_overrides(dropout_rate=0.0)

    config.num_train_steps = 600
    config.batch_size = 64
    config.num_microbatches = 1
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.schedule = "cosine"
    config.warmup_steps = 200
    config.decay_steps = 600
    config.end_factor = 0.05
    config.weight_decay = 0.01
    config.b2 = 0.98
    config.eps = 1e-9
    config.grad_clip_norm = 1.0
    config.label_smoothing = 0.0
    config.z_loss = 0.0
    config.loss_chunk_tokens = 0  # > 0: output projection + loss fused, this many tokens at a time (no logits held)

    config.mesh_shape = (-1, 1, 1)
    config.partitioning = "data_parallel"

    config.log_every_steps = 100
    config.eval_every_steps = 600
    config.eval_task = ""  # the task evaluated during training; empty: the training task (a mixture must set one)
    config.eval_split = "test"
    config.eval_examples = 1000  # 0 = the whole split
    config.eval_batch_size = 250
    config.checkpoint_every_steps = 300
    config.keep_checkpoints = 2  # the last K ...
    config.keep_best_checkpoints = 0  # ... plus the best K by best_metric (saved at eval steps)
    config.best_metric = "eval/loss"
    config.best_mode = "min"
    config.early_stopping_patience = 0  # stop after this many evals without a better best_metric; 0: never
    config.init_from = ""  # a training workdir (its latest params and vocab/) or a converted one (convert from-hf)
    # Word-level distillation (docs/compression.md): a trained workdir whose token distributions the model learns
    # too, run inside the train step; loss = (1 - w) * cross entropy + w * T^2 * KL(teacher_T || model_T).
    config.distill_teacher = ""
    config.distill_temperature = 1.0
    config.distill_weight = 0.5
    config.skip_nonfinite_updates = False  # True: drop an update whose loss/gradient is not finite, keep going
    config.debug_crash_after_step = 0  # fault injection (tests): SIGKILL right after saving that step
    config.profile_steps = ()  # e.g. (100, 110): a jax.profiler trace of those steps in WORKDIR/profile
    # evaluation decoding (periodic eval and t5x_lite.evaluate's defaults): beam_size 1 is greedy
    config.eval_beam_size = 1
    config.eval_alpha = 0.6  # GNMT length penalty ((5 + len) / 6) ** alpha for beam search
    config.eval_max_decode_length = 0  # 0: the task's target length
    config.show_examples = 3  # after the final evaluation, print this many (input, prediction, reference)
    return config


LOCAL_PRETRAIN_WORKDIR = "workdirs/pretrain_local"  # where configs/pretrain_local.py's command trains


SUMMARIZATION_BUCKETS = (48, 64, 96, 128, 192, 256, 384, 512)
"""Padded lengths of the 512-token summarization inputs: 8 batch shapes, not the default 20. Each shape is one
compilation of the train step, minutes apiece for t5_v1_1_mini on 2 busy cores; coarser buckets pad a little more."""


def local_finetune_options(*, steps: int, eval_every: int = 0) -> dict[str, Any]:
    """The ``OPTIONS`` of a local fine-tuning config (aeslc.py, scitldr.py, multi30k_t5.py), with its step counts;
    ``eval_every=0``: one greedy validation, at the last step, whatever ``steps`` the user picks."""
    return {
        "scratch": False,
        "pretrained": LOCAL_PRETRAIN_WORKDIR,
        "steps": steps,
        "batch_tokens": 4096,
        "seed": 0,
        "eval_every": eval_every,
    }


def local_finetune_sweep(add) -> None:
    """The comparison of issue 14: fine-tuned from the pre-trained checkpoint, and from scratch."""
    for scratch in (False, True):
        add(scratch=scratch)


def local_finetune_config(
    task: str,
    options: dict[str, Any],
    *,
    best_metric: str,
    bucket_boundaries: tuple[int, ...] = (),
) -> ml_collections.ConfigDict:
    """T5-style fine-tuning of ``t5_v1_1_mini`` on ``task`` with the parsed ``local_finetune_options``: from the
    ``pretrained`` workdir of configs/pretrain_local.py, or with ``scratch`` the same model from a random start; both
    with the pre-training vocabulary (``vocab_task``), Adafactor at a constant 1e-3, dropout 0.1, length-bucketed
    batches, so that the two runs differ in their starting parameters only; the best checkpoint by ``best_metric``
    (higher is better) is kept."""
    steps, eval_every = options["steps"], options["eval_every"] or options["steps"]
    config = default_train_config()
    config.seed = options["seed"]
    config.task = task
    config.vocab_task = "local_pretrain"
    config.init_from = "" if options["scratch"] else options["pretrained"]
    config.model = "t5_v1_1_mini"
    config.model_overrides = model_overrides(dropout_rate=0.1)
    config.pack = False
    config.batch_tokens = options["batch_tokens"]
    config.bucket_boundaries = tuple(bucket_boundaries)
    config.num_train_steps = steps
    config.optimizer = "adafactor"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_steps = 0
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0
    config.log_every_steps = 50
    config.eval_every_steps = eval_every
    config.eval_split = "validation"
    config.eval_examples = 0
    config.checkpoint_every_steps = eval_every
    config.keep_checkpoints = 1
    config.keep_best_checkpoints = 1
    config.best_metric = best_metric
    config.best_mode = "max"
    return config


def split_spec(spec: str) -> tuple[str, str | None]:
    """``'configs/multi30k.py:steps=10'`` -> ``('configs/multi30k.py', 'steps=10')``; no colon: ``(path, None)``."""
    path, colon, arg = spec.partition(":")
    return path, (arg if colon else None)


def load_module(path: str) -> ModuleType:
    """The config file at ``path`` as a module (under a private name, so two files never shadow each other)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (give a path such as configs/demo.py)")
    name = "t5x_lite_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} defines no get_config(arg=None)")
    return module


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config of ``'path[:options]'``, as ``python -m t5x_lite.train --config`` builds it, with dotted
    ``overrides`` (``{'model_overrides.dropout_rate': 0.1}``) applied like ``--config.key=value`` flags."""
    path, arg = split_spec(spec)
    module = load_module(path)
    config = module.get_config() if arg is None else module.get_config(arg)
    for key, value in (overrides or {}).items():
        set_key(config, key, value, what=path)
    return config


def set_key(config: ml_collections.ConfigDict, key: str, value: Any, *, what: str = "config") -> None:
    """``config.a.b = value`` for ``key='a.b'``; an unknown key is an error that lists the known ones."""
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise KeyError(f"{what}: {'.'.join(parents[: depth + 1])!r} is not a config section (in {key!r})")
        node = node[part]
    if leaf not in node:  # as ``--config.a.b=value`` on the train command, which rejects new keys too
        known = ", ".join(sorted(node.keys()))
        raise KeyError(f"{what}: unknown config key {key!r}; known keys here: {known}")
    node[leaf] = value


def file_options(path: str) -> dict[str, Any]:
    """The options (name -> default) that a config file's ``path:key=value`` argument accepts: its ``OPTIONS``."""
    return dict(getattr(load_module(path), "OPTIONS", {}))


def sweep_points(spec: str) -> list[dict[str, Any]]:
    """The points that ``sweep(add)`` of the config file declares, each a dict of ``add``'s keyword arguments.

    ``sweep`` may take a second argument: the file's options as parsed from ``spec`` (its ``OPTIONS`` updated
    by the ``:key=value`` part), so that a sweep can depend on them.
    """
    path, arg = split_spec(spec)
    module = load_module(path)
    sweep = getattr(module, "sweep", None)
    if not callable(sweep):
        raise ValueError(
            f"{path} defines no sweep(add); add one next to get_config, e.g.\n"
            "    def sweep(add):\n        for lr in (1e-3, 3e-3):\n            add(learning_rate=lr)"
        )
    points: list[dict[str, Any]] = []
    if len(inspect.signature(sweep).parameters) >= 2:
        sweep(lambda **point: points.append(point), parse_options(arg, getattr(module, "OPTIONS", {}), path))
    else:
        sweep(lambda **point: points.append(point))
    if not points:
        raise ValueError(f"{path}: sweep(add) added no point")
    return points
