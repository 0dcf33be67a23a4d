"""SciTLDR-A (abstract -> one-sentence TLDR): ``t5_v1_1_mini`` fine-tuned from configs/pretrain_local.py or
from scratch.

Command:   python -m t5x_lite.train --config configs/scitldr.py --workdir workdirs/scitldr              (fine-tune)
           python -m t5x_lite.train --config configs/scitldr.py:scratch=true --workdir workdirs/scitldr_scratch
           python -m t5x_lite.evaluate --workdir workdirs/scitldr --split test --beam_size 4 --alpha 0.6
           (the pre-trained workdir comes first: python -m t5x_lite.train --config configs/pretrain_local.py
           --workdir workdirs/pretrain_local; ``:pretrained=DIR`` points elsewhere)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      on the 2-core development machine (2026-12-03, each run sharing the cores with another job): from
           scratch 22.7 minutes, fine-tuned 22.0 minutes (400 steps, one greedy validation at the end); scoring each
           (experiments/pretraining_report.py: 2 beam validations + 1 beam test) about 6 minutes.
Result:    test ROUGE-1/2/L (F, best over the references; beam 4, alpha chosen on validation): fine-tuned from
           pretrain_local **23.80 / 7.56 / 21.29** (alpha 0.6), from scratch 20.78 / 5.68 / 19.20 (alpha 1.0)
           (experiments/results/scitldr.json). Published: CATTS (BART-large, 400M parameters pre-trained on 160 GB
           of text; Cachola et al., Findings of EMNLP 2020), abstract-only input, ROUGE-1 43.8 (docs/pretraining.md
           gives the source). This model has 16M parameters, was pre-trained on 21M characters and sees 400 steps.

Both runs use the pre-training vocabulary and the same settings (``config_files.local_finetune_config``): they
differ only in their starting parameters. Greedy validation ROUGE every ``eval_every`` steps; the best checkpoint
by ROUGE-L is kept besides the last. ``eval_every=0`` (the default) validates once, at the last step:
greedy decoding of a weak model is slow on a CPU, and the beam search of experiments/pretraining_report.py
makes the choices anyway.

Options: ``--config configs/scitldr.py:scratch=false,pretrained=workdirs/pretrain_local,steps=400,batch_tokens=4096,
seed=0,eval_every=0``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import (
    SUMMARIZATION_BUCKETS,
    local_finetune_config,
    local_finetune_options,
    local_finetune_sweep,
    parse_options,
)

OPTIONS = local_finetune_options(steps=400)
sweep = local_finetune_sweep  # the pre-trained and the from-scratch run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/scitldr.py")
    return local_finetune_config("scitldr", options, best_metric="eval/rougeL", bucket_boundaries=SUMMARIZATION_BUCKETS)
