"""Multi30k En->De (cased raw text, T5 prefix): ``t5_v1_1_mini`` fine-tuned from configs/pretrain_local.py or
from scratch.

Command:   python -m t5x_lite.train --config configs/multi30k_t5.py --workdir workdirs/multi30k_t5   (fine-tune)
           python -m t5x_lite.train --config configs/multi30k_t5.py:scratch=true --workdir workdirs/multi30k_t5_scratch
           python -m t5x_lite.evaluate --workdir workdirs/multi30k_t5 --split test_2016_flickr --beam_size 5 --alpha 1
           (the pre-trained workdir comes first: python -m t5x_lite.train --config configs/pretrain_local.py
           --workdir workdirs/pretrain_local; ``:pretrained=DIR`` points elsewhere)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      on the 2-core development machine (2026-12-03, each run sharing the cores with another job): from
           scratch 28.4 minutes, fine-tuned 30.9 minutes (300 steps, one greedy validation at the end); scoring
           each (experiments/pretraining_report.py: 2 beam validations + 2 beam test sets) about 6 minutes.
Result:    test_2016_flickr / test_2017_flickr tokenized lowercased BLEU (beam 5, alpha chosen on validation):
           fine-tuned from pretrain_local 5.25 / 2.79 (alpha 1.0), from scratch 6.12 / 3.40 (alpha 1.0)
           (experiments/results/multi30k_t5.json): after 300 steps pre-training does *not* help BLEU (-0.9 on
           test_2016), although it lowers the validation loss (4.17 against 4.84); both models still write generic
           captions that barely follow the source (docs/pretraining.md). 300 steps of at most 4,096 padded tokens
           are 1.85 passes over the 29,000 training pairs (162 batches an epoch). The published target for the
           task is 41.02 for a Transformer-tiny trained to convergence on the lowercased tokenized text (Wu et al.
           2021); configs/multi30k.py's Transformer-tiny trained for 88 minutes from scratch scores 40.3
           (experiments/results/multi30k.md).

Both runs use the pre-training vocabulary and the same settings (``config_files.local_finetune_config``): they
differ only in their starting parameters. Greedy validation BLEU every ``eval_every`` steps; the best checkpoint
by validation BLEU is kept besides the last. ``eval_every=0`` (the default) validates once, at the last step:
greedy decoding of a weak model is slow on a CPU, and the beam search of experiments/pretraining_report.py
makes the choices anyway.

Options: ``--config configs/multi30k_t5.py:scratch=false,pretrained=workdirs/pretrain_local,steps=300,
batch_tokens=4096,seed=0,eval_every=0``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import (
    local_finetune_config,
    local_finetune_options,
    local_finetune_sweep,
    parse_options,
)

OPTIONS = local_finetune_options(steps=300)
sweep = local_finetune_sweep  # the pre-trained and the from-scratch run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/multi30k_t5.py")
    return local_finetune_config("multi30k_ende", options, best_metric="eval/tok_bleu")
