"""Fine-tuning a released T5 v1.1 checkpoint (converted from Hugging Face) on any seq2seq task, T5's recipe.

Command:   python -m t5x_lite.convert from-hf --hf_dir HF_DIR --workdir workdirs/t5_v1_1_small
           (HF_DIR: a downloaded google/t5-v1_1-small directory: config.json, model weights, spiece.model; the
           converted workdir keeps spiece.model as vocab/, so fine-tuning tokenizes as pre-training did)
           python -m t5x_lite.train --config configs/t5_finetune.py:size=small,task=wmt16_enro,init_from=\\
               workdirs/t5_v1_1_small --workdir workdirs/t5_small_enro
           python -m t5x_lite.evaluate --workdir workdirs/t5_small_enro --split test --beam_size 4 --alpha 0.6
Hardware:  GPUs or a TPU slice; small fits one GPU, xl/xxl need ``--config.partitioning=fsdp`` over many chips.
Time:      not run here: the checkpoints come from the Hugging Face hub and WMT16's train split from the TFDS
           catalog, and this machine has no internet. The paper: 2^18 steps of 128 x 512 tokens (about 34B tokens)
           on TPU v3 slices.
Result:    not run here. Published (Raffel et al. 2020, Table 14; T5 v1.0, multi-task pre-trained, then fine-tuned
           per task; v1.1 was released without a results table): WMT16 En-Ro test BLEU 26.8 (small), 28.0 (base),
           28.1 (large), 28.2 (3B), 28.4 (11B); WMT14 En-De 26.7, 30.9, 32.0, 31.8, 32.1.

The recipe (Raffel et al. 2020, section 3.1.4 and the T5X fine-tuning gin): Adafactor at a constant learning rate
1e-3, dropout 0.1, batches of 128 sequences packed to the task's lengths, greedy validation decoding during
training, beam 4 and length penalty 0.6 at test time. Any registered seq2seq task works (``task=aeslc``,
``task=multi30k_ende``, ...): the local ones run on this machine too, only slowly (small is 77M parameters).
The evaluation split is ``validation`` where the task has one, else ``test`` (WMT16 En-Ro: newstest2016; its
newstest2015 dev set is not local): that split is then only watched, and no checkpoint is chosen by it.

Options: ``--config configs/t5_finetune.py:size=small,task=wmt16_enro,init_from=DIR,steps=262144,batch_size=128,
seed=0,eval_every=5000`` and ``--config.key=value``.
"""

from __future__ import annotations

import ml_collections

from t5x_lite.config_files import check_choice, default_train_config, model_overrides, parse_options
from t5x_lite.data.tasks import TaskRegistry

SIZES = ("small", "base", "large", "xl", "xxl")
OPTIONS = {
    "size": "small",
    "task": "wmt16_enro",
    "init_from": "",
    "steps": 2**18,
    "batch_size": 128,
    "seed": 0,
    "eval_every": 5000,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_options(arg, OPTIONS, "configs/t5_finetune.py")
    size = check_choice(options, "size", SIZES, "configs/t5_finetune.py")
    if not options["init_from"]:
        raise ValueError(
            "configs/t5_finetune.py needs init_from=DIR: a workdir written by `python -m t5x_lite.convert from-hf "
            "--hf_dir HF_DIR --workdir DIR` (HF_DIR: google/t5-v1_1-<size> downloaded from the Hugging Face hub)"
        )
    task = TaskRegistry.get(options["task"])  # an unknown name is an error that lists the registered tasks
    config = default_train_config()
    config.seed = options["seed"]
    config.task = task.name
    config.init_from = options["init_from"]
    config.model = f"t5_v1_1_{size}"
    config.model_overrides = model_overrides(dropout_rate=0.1)
    config.partitioning = "fsdp" if size in ("xl", "xxl") else "data_parallel"
    config.pack = True
    config.batch_size = options["batch_size"]

    config.num_train_steps = options["steps"]
    config.optimizer = "adafactor"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_steps = 0
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0

    config.log_every_steps = 100
    config.eval_every_steps = options["eval_every"]
    config.eval_split = "validation" if "validation" in task.splits else "test"
    config.eval_examples = 0
    config.checkpoint_every_steps = options["eval_every"]
    config.keep_checkpoints = 2
    if config.eval_split == "validation" and task.metrics:  # choose on validation only, never on test
        config.keep_best_checkpoints = 1
        config.best_metric = {"rouge": "eval/rougeL"}.get(task.metrics[0], f"eval/{task.metrics[0]}")
        config.best_mode = "max"
    return config
