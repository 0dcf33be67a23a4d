"""SciTLDR-A (abstract -> one-sentence TLDR): ``t5_v1_1_mini`` fine-tuned from configs/pretrain_local.py or
from scratch.

Command:   python -m t5x_lite.train --config configs/scitldr.py --workdir workdirs/scitldr              (fine-tune)
           python -m t5x_lite.train --config configs/scitldr.py:scratch=true --workdir workdirs/scitldr_scratch
           python -m t5x_lite.evaluate --workdir workdirs/scitldr --split test --beam_size 4 --alpha 0.6
           (the pre-trained workdir comes first: python -m t5x_lite.train --config configs/pretrain_local.py
           --workdir workdirs/pretrain_local; ``:pretrained=DIR`` points elsewhere)
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      not yet measured (docs/pretraining.md).
Result:    not yet measured: test ROUGE-1/2/L (F, best over the references: 3.2 a paper on test), beam search, the
           beam and length penalty chosen on the validation split. Published: see docs/pretraining.md (Cachola et al.
           2020 report BART-large, 400M parameters, pre-trained on 160 GB of text); this model has about 16M
           parameters and was pre-trained on 21M characters.

Both runs use the pre-training vocabulary and the same settings (``config_files.local_finetune_config``): they
differ only in their starting parameters. Greedy validation ROUGE every ``eval_every`` steps; the best checkpoint
by ROUGE-L is kept besides the last.

Options: ``--config configs/scitldr.py:scratch=false,pretrained=workdirs/pretrain_local,steps=800,batch_tokens=4096,
seed=0,eval_every=200``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import (
    LOCAL_PRETRAIN_WORKDIR,
    SUMMARIZATION_BUCKETS,
    local_finetune_config,
    parse_options,
)

OPTIONS = {
    "scratch": False,
    "pretrained": LOCAL_PRETRAIN_WORKDIR,
    "steps": 800,
    "batch_tokens": 4096,
    "seed": 0,
    "eval_every": 200,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/scitldr.py")
    config = local_finetune_config(
        "scitldr",
        pretrained=options["pretrained"],
        scratch=options["scratch"],
        steps=options["steps"],
        batch_tokens=options["batch_tokens"],
        seed=options["seed"],
        eval_every=options["eval_every"],
        bucket_boundaries=SUMMARIZATION_BUCKETS,
    )
    config.best_metric = "eval/rougeL"
    config.best_mode = "max"
    return config


def sweep(add) -> None:
    """The comparison of issue 14: fine-tuned from the pre-trained checkpoint, and from scratch."""
    for scratch in (False, True):
        add(scratch=scratch)
