"""fairseq's training loop held in a process of its own, run N updates at a time on request (for nmt_bench.py).

Run by nmt_bench.py with the fairseq virtual environment's Python; it is not part of t5x_lite and imports only
fairseq. It builds the task, model, criterion and trainer exactly as ``fairseq-train`` does (fairseq_cli/train.py)
from the ``fairseq-train`` arguments given after ``--``, then reads commands on stdin:

    run N    train N more updates (epochs roll over as in fairseq-train); reply with one JSON line:
             {"updates": N, "seconds": wall time of the N updates, "target_tokens": real target tokens,
              "sentences": ..., "loss": mean training loss}
    quit     exit

Its first line on stdout describes the data: {"ready": true, "mean_target_tokens_per_update": ...} over one
epoch of fairseq's own batches, so that the benchmark can give t5x_lite the same number of tokens per update.
"""

import json
import sys
import time


def main(argv):
    import numpy as np
    import torch
    from fairseq import options, tasks, utils
    from fairseq.data import iterators
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.logging import metrics
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    metrics.reset()
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=True)
    sizes = task.dataset("train").tgt_sizes
    per_update = [int(np.sum(sizes[batch])) for batch in epoch_itr.frozen_batches]
    print(
        json.dumps(
            {
                "ready": True,
                "mean_target_tokens_per_update": float(np.mean(per_update)),
                "updates_per_epoch": len(per_update),
                "torch_threads": torch.get_num_threads(),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        ),
        flush=True,
    )

    def epoch_iterator(epoch_itr):
        itr = epoch_itr.next_epoch_itr(fix_batches_to_gpus=False, shuffle=True)
        trainer.begin_epoch(epoch_itr.epoch)
        return iterators.GroupedIterator(itr, 1)

    itr = epoch_iterator(epoch_itr)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        count = int(command[1])
        tokens = sentences = 0
        losses = []
        start = time.perf_counter()
        for _ in range(count):
            if not itr.has_next():
                epoch_itr = trainer.get_train_iterator(epoch_itr.next_epoch_idx, load_dataset=False)
                itr = epoch_iterator(epoch_itr)
            samples = next(itr)
            with metrics.aggregate("train_inner"):
                log_output = trainer.train_step(samples)
            tokens += sum(int(sample["ntokens"]) for sample in samples)
            sentences += sum(int(sample["nsentences"]) for sample in samples)
            if log_output is not None:
                losses.append(float(log_output.get("loss", float("nan"))))
        seconds = time.perf_counter() - start
        reply = {"updates": count, "seconds": seconds, "target_tokens": tokens, "sentences": sentences}
        reply["loss"] = float(np.mean(losses)) if losses else float("nan")
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    separator = sys.argv.index("--") if "--" in sys.argv else 0
    main(sys.argv[separator + 1 :])
