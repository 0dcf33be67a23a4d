"""Transfer a trained Multi30k En->De model to En->Fr (or En->Cs): full fine-tuning, or LoRA adapters only.

Command:   python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k \\
               --workdir workdirs/multi30k_enfr_full
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,lora_rank=4 \\
               --workdir workdirs/multi30k_enfr_lora
           python -m t5x_lite.evaluate --workdir workdirs/multi30k_enfr_lora --split test_2016_flickr --beam_size 4 \\
               --alpha 1
           python -m t5x_lite.lora_merge --workdir workdirs/multi30k_enfr_lora --out workdirs/multi30k_enfr_merged
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      about 10 minutes each on the 2-core development machine (1,500 steps; LoRA steps are cheaper: no
           weight gradients for the frozen base).
Result:    docs/compression.md (the LoRA row): test_2016_flickr tokenized lowercased BLEU, trainable parameters and
           optimizer-state bytes of both runs.

``init_from`` is a workdir of configs/multi30k.py (any step count); its vocabulary (a joint En/De BPE) is kept, so
French is spelled in En/De pieces. The task ``multi30k_en{tgt}_tok`` lowercases and Moses-tokenizes the raw files
on reading, as Multi30k's ``tok/`` files were made (``tok/`` has en and de only). ``lora_rank`` = 0 fine-tunes
every weight; ``lora_rank`` = R trains rank-R Qwix adapters on every attention and MLP weight (t5x_lite.lora) and
nothing else: 18,432 x R parameters for Transformer-tiny (rank 4: 3.2% of its 2.32M). ``lr`` = 0 picks 1e-3 for
full fine-tuning and 5e-3 for LoRA (adapters start at zero and take a larger step).

Options: ``:init_from=DIR,tgt=fr,lora_rank=0,lora_alpha=0,steps=1500,lr=0,seed=1`` and ``--config.key=value``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import check_choice, default_train_config, model_overrides, parse_options

OPTIONS = {"init_from": "", "tgt": "fr", "lora_rank": 0, "lora_alpha": 0.0, "steps": 1500, "lr": 0.0, "seed": 1}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/multi30k_transfer.py")
    if not options["init_from"]:
        raise ValueError(
            "configs/multi30k_transfer.py: give the En->De model to start from, "
            "e.g. configs/multi30k_transfer.py:init_from=workdirs/multi30k"
        )
    tgt = check_choice(options, "tgt", ("fr", "cs"), "configs/multi30k_transfer.py")
    rank, steps = options["lora_rank"], options["steps"]
    config = default_train_config()
    config.seed = options["seed"]
    config.task = f"multi30k_en{tgt}_tok"
    config.init_from = options["init_from"]
    config.model = "transformer_tiny"
    config.model_overrides = model_overrides(
        dropout_rate=0.3, dropout_generator="hash", lora_rank=rank, lora_alpha=options["lora_alpha"] or None
    )

    config.pack = False
    config.batch_tokens = 4096
    config.loss_chunk_tokens = 1024

    config.num_train_steps = steps
    config.optimizer = "adamw"
    config.learning_rate = options["lr"] or (5e-3 if rank else 1e-3)
    config.schedule = "warmup_rsqrt"
    config.warmup_steps = 100
    config.cooldown_steps = int(0.4 * steps)  # linearly to 0 over the last 40%, as configs/multi30k.py
    config.b2 = 0.98
    config.eps = 1e-8
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.1

    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.eval_split = "validation"
    config.eval_examples = 0
    config.eval_batch_size = 256
    config.eval_beam_size = 1
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    config.keep_best_checkpoints = 1
    config.best_metric = "eval/tok_bleu"
    config.best_mode = "max"
    return config
