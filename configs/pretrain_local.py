"""Span-corruption pre-training of a CPU-sized T5 v1.1 on every local monolingual text (task ``local_pretrain``).

Command:   python -m t5x_lite.train --config configs/pretrain_local.py --workdir workdirs/pretrain_local
           (then configs/aeslc.py, configs/scitldr.py and configs/multi30k_t5.py fine-tune from that workdir)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      54 minutes on the 2-core development machine (2026-12-02; 2,400 steps at about 1.2 s each, 4 evaluations),
           with niced tests sharing the cores for about 25 of them.
Result:    held-out passages (task ``local_pretrain_all``, split validation): eval/loss 2.987, eval/accuracy 54.8% of
           the span-corruption target tokens (3.869 / 50.3% at step 600, 3.486 / 51.7% at 1,200, 3.214 / 52.8% at
           1,800: still falling at the end). The run logs train/loss and train/accuracy every 100 steps.

What it trains on (t5x_lite/data/monolingual.py, docs/pretraining.md): Multi30k train captions in en, de, fr and cs,
AESLC train email bodies, SciTLDR-A train abstracts, the IWSLT16 TED/TEDx tst2013-2014 talks (de, en) and the
IWSLT14 train sample (de, en): about 21M characters, mixed by size; every split any task evaluates on stays out.
One SentencePiece unigram vocabulary of 16,000 pieces + 100 sentinels is trained on all of it (``vocab_task``
``local_pretrain`` makes the fine-tuning and from-scratch runs use the same one).

The recipe is T5 v1.1's (Raffel et al. 2020; T5X's pretrain gin) scaled to a CPU: noise density 0.15, mean span 3,
packed 128-token inputs (141 raw tokens -> 29 targets), Adafactor with factored second moments, no dropout,
constant learning rate 0.01 after a warm-up (T5's ``1/sqrt(max(step, 10k))`` is 0.01 until step 10,000), then a
linear cooldown to 0 over the last 20% of the steps so that the short run ends at a low learning rate.

Options: ``--config configs/pretrain_local.py:steps=2400,batch_size=32,seed=0,eval_every=600`` and
``--config.key=value``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import default_train_config, model_overrides, parse_options

OPTIONS = {"steps": 2400, "batch_size": 32, "seed": 0, "eval_every": 600}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/pretrain_local.py")
    config = default_train_config()
    config.seed = options["seed"]
    config.task = "local_pretrain"  # a mixture: one span-corruption task per body of text, rates by characters
    config.eval_task = "local_pretrain_all"
    config.eval_split = "validation"
    config.eval_examples = 0  # all 1,718 held-out passages
    config.vocab_task = "local_pretrain"

    config.model = "t5_v1_1_mini"
    config.model_overrides = model_overrides(dropout_rate=0.0)  # T5 v1.1 pre-trains without dropout
    config.pack = True
    config.batch_size = options["batch_size"]

    steps = options["steps"]
    config.num_train_steps = steps
    config.optimizer = "adafactor"
    config.learning_rate = 0.01
    config.schedule = "constant"
    config.warmup_steps = min(500, steps // 4)
    config.linear_warmup = True
    config.cooldown_steps = steps // 5
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0

    config.log_every_steps = 100
    config.eval_every_steps = options["eval_every"]
    config.checkpoint_every_steps = options["eval_every"]
    config.keep_checkpoints = 1
    return config
