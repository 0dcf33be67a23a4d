"""AESLC (email body -> subject line): ``t5_v1_1_mini`` fine-tuned from configs/pretrain_local.py, or from scratch.

Command:   python -m t5x_lite.train --config configs/aeslc.py --workdir workdirs/aeslc              (fine-tune)
           python -m t5x_lite.train --config configs/aeslc.py:scratch=true --workdir workdirs/aeslc_scratch
           python -m t5x_lite.evaluate --workdir workdirs/aeslc --split test --beam_size 4 --alpha 0.6
           (the pre-trained workdir comes first: python -m t5x_lite.train --config configs/pretrain_local.py
           --workdir workdirs/pretrain_local; ``:pretrained=DIR`` points elsewhere)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      on the 2-core development machine (2026-12-02, each run sharing the cores with another training): from
           scratch 49.7 minutes, fine-tuned 38.1 minutes (600 steps, 3 greedy validations each); scoring both
           (experiments/pretraining_report.py: 2 beam validations + 1 beam test each) 17 minutes, both points at once.
Result:    test ROUGE-1/2/L (F, best of the 3 references; beam 4, alpha chosen on validation: 1.0 fine-tuned, 0.6
           from scratch): fine-tuned from pretrain_local **6.08 / 0.90 / 6.07**, from scratch 2.41 / 0.00 / 2.41
           (experiments/results/aeslc.json): pre-training gains 3.7 ROUGE-L, but both are far below PEGASUS-large's
           37.69 / 21.85 / 36.84 (google-research/pegasus README; 568M parameters pre-trained on C4, fine-tuned to
           convergence). This model has 16M parameters, was pre-trained on 21M characters, and sees 600 steps
           (under one epoch of AESLC): it has learned little beyond frequent subject-line words.
           Reproduced: the fine-tuned figure came out identical on a fresh machine and clone (2026-12-03).

Both runs use the pre-training vocabulary and the same settings (``config_files.local_finetune_config``): they
differ only in their starting parameters. Greedy validation ROUGE every ``eval_every`` steps; the best checkpoint
by ROUGE-L is kept besides the last.

Options: ``--config configs/aeslc.py:scratch=false,pretrained=workdirs/pretrain_local,steps=600,batch_tokens=4096,
seed=0,eval_every=200``.
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

OPTIONS = local_finetune_options(steps=600, eval_every=200)
sweep = local_finetune_sweep  # the pre-trained and the from-scratch run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/aeslc.py")
    return local_finetune_config("aeslc", options, best_metric="eval/rougeL", bucket_boundaries=SUMMARIZATION_BUCKETS)
