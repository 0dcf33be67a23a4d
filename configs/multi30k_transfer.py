"""Transfer a trained Multi30k En->De model to En->Fr (or En->Cs, or De->En), or to TED talks (En->De, another domain):
full fine-tuning, or LoRA adapters only.

Command:   python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k \\
               --workdir workdirs/multi30k_enfr_full
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,lora_rank=4,\
               lora_embed=True --workdir workdirs/multi30k_enfr_lora
           # the best LoRA here: rank 4 and the table rows of the 300 most frequent French tokens (4.76% trainable)
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,lora_rank=4,\
               lora_rows=300,lr=0.03,steps=1000 --workdir workdirs/multi30k_enfr_rows
           python -m t5x_lite.evaluate --workdir workdirs/multi30k_enfr_lora --split test_2016_flickr --beam_size 4 \\
               --alpha 1
           python -m t5x_lite.lora_merge --workdir workdirs/multi30k_enfr_lora --out workdirs/multi30k_enfr_merged
           # the reverse direction (De->En, no new vocabulary); LoRA+ (b_lr: the B factors' learning rate):
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,tgt=en,\
               lora_rank=4,lora_rows=300,lr=0.01,b_lr=0.08,rows_lr=0.03,steps=1000 --workdir workdirs/multi30k_deen
           # the same on TED talks (iwslt14_ende_tok; evaluate --split test):
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,tgt=ted \\
               --workdir workdirs/multi30k_ted_full
           # QLoRA (the frozen base held int8), with an adapter on the output projection too:
           python -m t5x_lite.train --config configs/multi30k_transfer.py:init_from=workdirs/multi30k,lora_rank=4,\
               lora_output=True --config.quantization=int8 --workdir workdirs/multi30k_enfr_qlora
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      a train step on a 128 x 32-token batch takes 0.38 s (full), 0.39 s (LoRA) and 0.76 s (LoRA with the
           output adapter: whole logits, no fused loss; 0.42 s with the table adapter) on the 2-core machine (QUIET,
           experiments/results/compression.json), so 1,000 steps are some 8-15 minutes with evaluation. The train
           command's own step over its length-bucketed batches: 0.42-0.48 s (LoRA) and 0.44-0.56 s (full; QUIET,
           2026-12-04; LoRA took 2-3x longer there before trainer.train_compiler_options, docs/compression.md).
Result:    measured with ``:steps=1000`` from a 4,000-step configs/multi30k.py model (docs/compression.md, QUIET
           2026-12-04): tokenized lowercased BLEU, beam 4. En->Fr test_2016_flickr: full fine-tuning 36.08; LoRA
           rank 4 9.83, with ``lora_output=True`` 12.89, with ``lora_embed=True`` 13.81, 19.95 at ``lr=0.015``
           and 21.70 at ``lr=0.03`` (4.5% of the parameters trainable, optimizer state 0.85 MB against 18.9 MB).
           TED (``tgt=ted``) test: full fine-tuning 7.78, LoRA rank 4 4.31, with ``lora_embed=True`` 4.69. LoRA is
           far behind on both: full fine-tuning's change is high-rank (experiments/lora_rank_analysis.py;
           docs/compression.md). From a new 4,000-step base (2026-12-05): full fine-tuning 35.35; rank 4 with the
           300 most frequent French tokens' table rows trainable (``lora_rank=4,lora_rows=300,lr=0.03``, 4.76%
           trainable) 28.86, the best LoRA here, still 6.5 BLEU short. De->En (``tgt=en``, every table row already
           trained; 2026-12-05, experiments/results/lora_deen.json): full fine-tuning 39.17 (1,000 steps) and 41.37
           (3,000); rank 4 with 300 rows 33.96 and 35.41, LoRA+ 33.94 (1,000): some 6 BLEU short there too.
           TED from the same base (``tgt=ted,steps=1000``, test split): full fine-tuning 7.43; rank 4 with 300
           rows (``lora_rank=4,lora_rows=300,lr=0.03``) 5.50, 1.9 BLEU short; at ``steps=3000`` 8.74 and 6.01
           (experiments/results/lora_ted.json). From a 4x larger base (d_model 256, FFN 1,024, 9.47M parameters;
           2026-12-06, experiments/results/lora_wide.json; pass the base's ``--config.model_overrides.d_model=256
           --config.model_overrides.d_ff=1024`` here too): full fine-tuning 44.44; rank 8 with 400 rows
           (``lora_rank=8,lora_rows=400,lr=0.01``, 4.89% trainable) 39.51, 4.9 short; rank 4 with 1,100 rows
           (``lr=0.03``) 37.20; rank 8 at ``lr=0.03`` diverged.

``init_from`` is a workdir of configs/multi30k.py (any step count); its vocabulary (a joint En/De BPE) is kept, so
French is spelled in En/De pieces. The task ``multi30k_en{tgt}_tok`` lowercases and Moses-tokenizes the raw files
on reading, as Multi30k's ``tok/`` files were made (``tok/`` has en and de only). ``lora_rank`` = 0 fine-tunes
every weight; ``lora_rank`` = R trains rank-R Qwix adapters on every attention and MLP weight (t5x_lite.lora) and
nothing else: 18,432 x R parameters for Transformer-tiny (rank 4: 3.1% of its 2.36M); ``lora_output=True`` adds
one on the output projection (8,320 x R more with the 8,192-row table; rank 4: 4.5% in all); ``lora_embed=True``
one on the token table itself, seen by the lookups and the tied output projection alike (the same count);
``lora_rows=K`` trains a full change of the table rows of the K most frequent target tokens of the fine-tuning data
(K x 128 parameters; 300: 1.6%) at ``rows_lr`` (0: ``lr``); ``b_lr`` is the adapters' B factors' learning rate
(LoRA+; 0: ``lr``).
``lr`` = 0 picks 1e-3 for full fine-tuning and 5e-3 for LoRA (adapters start at zero and take a larger step).
Dropout is 0.1, not the from-scratch recipe's 0.3: on En->Fr it gave 33.16 instead of 25.19
validation BLEU (full fine-tuning, greedy) and 9.49 instead of 4.90 (LoRA rank 4) after 1,000 steps.

Options: ``:init_from=DIR,tgt=fr|cs|en|ted,lora_rank=0,lora_alpha=0,lora_output=False,lora_embed=False,lora_rows=0,
rows_lr=0,b_lr=0,steps=1500,lr=0,seed=1`` and
``--config.key=value`` (``--config.quantization=int8`` with ``lora_rank``: QLoRA).
"""

from __future__ import annotations

import os

import ml_collections

from t5x_lite.config_files import check_choice, load_config, parse_options

OPTIONS = {
    "init_from": "",
    "tgt": "fr",
    "lora_rank": 0,
    "lora_alpha": 0.0,
    "lora_output": False,
    "lora_embed": False,
    "lora_rows": 0,
    "rows_lr": 0.0,
    "b_lr": 0.0,
    "steps": 1500,
    "lr": 0.0,
    "seed": 1,
}
# tgt -> task: a new target language (Multi30k captions), or the same En->De on another domain (TED talks)
# tgt=en turns the direction round (De->En on tok/): the same two languages and vocabulary, a new task for every
# weight but the token table, whose rows are all trained already (both languages' embeddings, tied to the output)
TASKS = {"fr": "multi30k_enfr_tok", "cs": "multi30k_encs_tok", "en": "multi30k_deen_tok", "ted": "iwslt14_ende_tok"}
MULTI30K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi30k.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/multi30k.py's model, batches, Adam and label smoothing, fine-tuning on another target language."""
    options = parse_options(arg, OPTIONS, "configs/multi30k_transfer.py")
    if not options["init_from"]:
        raise ValueError(
            "configs/multi30k_transfer.py: give the En->De model to start from, "
            "e.g. configs/multi30k_transfer.py:init_from=workdirs/multi30k"
        )
    tgt = check_choice(options, "tgt", tuple(TASKS), "configs/multi30k_transfer.py")
    rank, steps = options["lora_rank"], options["steps"]
    config = load_config(f"{MULTI30K}:steps={steps},seed={options['seed']}")
    config.task = TASKS[tgt]
    if tgt == "ted":
        config.eval_examples = 1000  # of the 4,600-pair validation split: greedy BLEU every 500 steps stays cheap
    config.init_from = options["init_from"]
    config.model_overrides.lora_rank = rank
    config.model_overrides.lora_output = bool(options["lora_output"])
    config.model_overrides.lora_embed = bool(options["lora_embed"])
    config.lora_rows = options["lora_rows"]
    config.lora_rows_lr = options["rows_lr"]
    config.lora_b_lr = options["b_lr"]
    config.model_overrides.dropout_rate = 0.1  # better than 0.3 for fine-tuning here, full and LoRA (docstring)
    if options["lora_alpha"]:
        config.model_overrides.lora_alpha = options["lora_alpha"]
    config.learning_rate = options["lr"] or (5e-3 if rank else 1e-3)
    config.warmup_steps = 100
    config.cooldown_steps = int(0.4 * steps)  # linearly to 0 over the last 40%, as configs/multi30k.py
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    config.keep_best_checkpoints = 1
    return config
