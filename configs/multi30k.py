"""Multi30k En->De with Wu et al. (2021)'s text-only Transformer-tiny, scored like the paper (tokenized BLEU).

Command:   python -m t5x_lite.train --config configs/multi30k.py --workdir workdirs/multi30k
           python -m t5x_lite.evaluate --workdir workdirs/multi30k --split test_2016_flickr --beam_size 4
Hardware:  one CPU (2 cores); any GPU or TPU works unchanged.
Time:      about 1 s per step on 2 idle CPU cores at batch 32. The recorded run (steps=2500,batch_size=32) shared
           the cores with other jobs: 1,133 steps in 90 min, then it was stopped (SIGTERM saved step 1133).
Result:    that run, beam 4, average of steps 750/1000/1133: test_2016_flickr sacreBLEU 5.83, tokenized BLEU 5.99.
           It was far from converged. The published baseline, after far longer training, is 41.02 tokenized
           lowercased BLEU (Revisit-MMT README-baseline.md, Wu et al. ACL 2021).

Options: ``--config configs/multi30k.py:steps=20000,batch_size=128`` and ``--config.key=value`` overrides.
"""

from __future__ import annotations

import ml_collections

from configs.common import default_train_config, parse_options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, {"steps": 6000, "batch_size": 64}, "configs/multi30k.py")
    config = default_train_config()
    config.task = "multi30k_ende"
    config.model = "transformer_tiny"  # 4+4 layers, d_model 128, dropout 0.3, shared embeddings
    config.model_overrides = ml_collections.ConfigDict({"dropout_rate": 0.3})  # as the preset; overridable

    config.num_train_steps = options["steps"]
    config.batch_size = options["batch_size"]  # packed rows of 64 tokens: about 1.9 sentence pairs each
    config.learning_rate = 2e-3
    config.schedule = "cosine"
    config.warmup_steps = 1000
    config.decay_steps = options["steps"]
    config.end_factor = 0.05
    config.weight_decay = 0.0001
    config.label_smoothing = 0.1

    config.log_every_steps = 200
    config.eval_every_steps = 2000
    config.eval_split = "validation"
    config.eval_examples = 0  # the whole split
    config.eval_batch_size = 128
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 5  # evaluate --average_last 5
    config.keep_best_checkpoints = 0
    config.eval_beam_size = 1
    return config
