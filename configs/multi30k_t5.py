"""Multi30k En->De (cased raw text, T5 prefix): ``t5_v1_1_mini`` fine-tuned from configs/pretrain_local.py or
from scratch.

Command:   python -m t5x_lite.train --config configs/multi30k_t5.py --workdir workdirs/multi30k_t5   (fine-tune)
           python -m t5x_lite.train --config configs/multi30k_t5.py:scratch=true --workdir workdirs/multi30k_t5_scratch
           python -m t5x_lite.evaluate --workdir workdirs/multi30k_t5 --split test_2016_flickr --beam_size 5 --alpha 1
           (the pre-trained workdir comes first: python -m t5x_lite.train --config configs/pretrain_local.py
           --workdir workdirs/pretrain_local; ``:pretrained=DIR`` points elsewhere)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      not yet measured (docs/pretraining.md).
Result:    not yet measured: test_2016_flickr tokenized lowercased BLEU, beam 5, the length penalty chosen on the
           validation split. For scale: configs/multi30k.py's Transformer-tiny trained for 88 minutes from scratch
           scores 40.3 (experiments/results/multi30k.md); this run measures what pre-training adds to a T5 v1.1 model.

Both runs use the pre-training vocabulary and the same settings (``config_files.local_finetune_config``): they
differ only in their starting parameters. Greedy validation BLEU every ``eval_every`` steps; the best checkpoint
by validation BLEU is kept besides the last.

Options: ``--config configs/multi30k_t5.py:scratch=false,pretrained=workdirs/pretrain_local,steps=750,
batch_tokens=4096,seed=0,eval_every=250``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import (
    local_finetune_config,
    local_finetune_options,
    local_finetune_sweep,
    parse_options,
)

OPTIONS = local_finetune_options(steps=750, eval_every=250)
sweep = local_finetune_sweep  # the pre-trained and the from-scratch run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/multi30k_t5.py")
    return local_finetune_config("multi30k_ende", options, best_metric="eval/tok_bleu")
