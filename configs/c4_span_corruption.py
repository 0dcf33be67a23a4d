"""T5 v1.1 pre-training: span corruption on C4 (inputs 512 -> targets 114), Adafactor, T5's rsqrt schedule.

Command:   python -m t5x_lite.aot --config configs/c4_span_corruption.py:size=xxl --topology v5p-256
           (the ahead-of-time memory / FLOPs plan for a TPU pod; needs `pip install '.[tpu]'`, no data, no TPU)
           python -m t5x_lite.train --config configs/c4_span_corruption.py:size=base --workdir WORKDIR
           (on the pod itself: the same command on every host, WORKDIR on a disk they share)
Hardware:  a TPU pod slice (v4-128 ... v5p-256, v5e-256): see docs/scaling.md ("Ahead-of-time plans for TPU pods")
           for which sizes fit which slice with which remat / partitioning. Not trainable on this 2-core CPU machine.
Time:      training: not measured (no TPU here). The plan's "100% MFU" line gives the floor per step (xxl: 0.729 s
           on v5p-256, 0.849 s on v5e-256); the T5 paper's final models took 2^11 x 512 tokens x ~1M steps (~1T
           tokens). The aot command on 2 shared CPU cores: 2-14 min for a plan that fits, 10-25 s for one that doesn't.
Result:    not measured here. C4 comes from the TFDS catalog (`c4/en`, prepared with internet access and Apache
           Beam, hundreds of GB), which this machine lacks; the aot command needs no data. Point the task's vocab_path
           at T5's SentencePiece model (32,000 pieces + 100 sentinels = 32,128 rows, as the presets assume) for
           checkpoints compatible with the released T5 v1.1 ones.

Options (``--config configs/c4_span_corruption.py:size=xl,batch_size=1024``):
  size            small | base | large | xl | xxl -> model t5_v1_1_<size>
  batch_size      global batch in packed sequences (T5: 2048 = 2^11)
  steps           optimizer updates
  partitioning    auto (data_parallel for small/base, fsdp for large/xl/xxl) | data_parallel | fsdp | fsdp_tp
  model_parallel  size of the 'model' mesh axis for fsdp_tp (keep it within a host: 2 or 4)
  remat           auto (full for xl/xxl, none below) | none | minimal | full  (TransformerConfig.remat_policy)
  microbatches    gradient accumulation steps per update (the same update, less activation memory)
and any ``--config.key=value`` override, e.g. ``--config.model_overrides.remat_policy=full``. On NVIDIA GPUs add
``--config.pack=False --config.model_overrides.attention_kernel=cudnn`` (cuDNN flash attention takes padded, not
packed, batches; on one H200 it made t5_v1_1_base's bf16 step 1.47x faster, 39.2% MFU at batch 256:
experiments/results/gpu.md).
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import check_choice, default_train_config, model_overrides, parse_options

SIZES = ("small", "base", "large", "xl", "xxl")
OPTIONS = {
    "size": "small",
    "batch_size": 2048,
    "steps": 1_000_000,
    "partitioning": "auto",
    "model_parallel": 4,
    "remat": "auto",
    "microbatches": 1,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/c4_span_corruption.py")
    size = check_choice(options, "size", SIZES, "configs/c4_span_corruption.py")
    config = default_train_config()
    config.task = "c4_span_corruption"  # 512 input tokens (from 568 raw) -> 114 target tokens
    config.pack = True
    config.model = f"t5_v1_1_{size}"
    remat = options["remat"]
    if remat == "auto":  # without remat xxl needs 125 GiB a chip on v5p-256, 63 on v5e-256 (docs/scaling.md)
        remat = "full" if size in ("xl", "xxl") else "none"
    # T5 v1.1: no dropout in pre-training; bfloat16 activations, float32 parameters (as T5X); layers scanned so
    # compile time does not grow with depth.
    config.model_overrides = model_overrides(dropout_rate=0.0, dtype="bfloat16", scan_layers=True, remat_policy=remat)

    config.num_train_steps = options["steps"]
    config.batch_size = options["batch_size"]
    config.num_microbatches = options["microbatches"]
    # Adafactor (factored second moments, no momentum, update clipping 1.0, parameter-scaled) with T5's schedule:
    # 1 / sqrt(max(step, 10000)), i.e. 1e-2 for the first 10,000 steps, then inverse square root decay.
    config.optimizer = "adafactor"
    config.learning_rate = 1.0
    config.schedule = "rsqrt"
    config.warmup_steps = 10_000
    config.linear_warmup = False
    config.decay_steps = None
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.0
    config.z_loss = 1e-4  # T5X's default for pre-training

    partitioning = options["partitioning"]
    if partitioning == "auto":
        partitioning = "data_parallel" if size in ("small", "base") else "fsdp"
    config.partitioning = partitioning
    config.mesh_shape = {
        "data_parallel": (-1, 1, 1),
        "fsdp": (1, -1, 1),
        "fsdp_tp": (1, -1, options["model_parallel"]),
    }.get(partitioning, (1, -1, 1))

    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.eval_split = "validation"
    config.eval_examples = 8192
    config.eval_batch_size = 512
    config.checkpoint_every_steps = 5_000
    config.keep_checkpoints = 3
    return config
