"""Is the input pipeline ever the bottleneck? Packed Multi30k examples per second against a t5_small train step.

    python experiments/benchmarks/data_bench.py [--task multi30k_ende --batch_size 32 --batches 200]

Measures, in one run on this machine: (1) the Grain pipeline's packed training examples per second (tokenize,
shuffle, pack, batch, model features; one process, no workers); (2) how many packed examples one jit-compiled
t5_small train step (forward, backward, Adafactor update; float32) consumes per second on the same batches.
Prints both and their ratio; the target is a ratio of at least 10.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_lite import network
from t5x_lite.data import pipeline
from t5x_lite.data.tasks import TaskRegistry, task_vocabulary
from t5x_lite.presets import embedding_rows, get_model_config


def examples_in(batch) -> int:
    """Packed examples in a batch: the number of distinct non-zero segment ids of each row, summed."""
    return int(batch["decoder_segment_ids"].max(axis=1).sum())


def measure_pipeline(task, vocab, batch_size: int, batches: int) -> tuple[float, list]:
    dataset = pipeline.train_dataset(task, vocab, batch_size=batch_size, seed=0)
    iterator = iter(dataset)
    warmup = [next(iterator) for _ in range(5)]
    start = time.perf_counter()
    measured = list(itertools.islice(iterator, batches))
    elapsed = time.perf_counter() - start
    return sum(examples_in(b) for b in measured) / elapsed, warmup + measured


def train_step_fn(cfg):
    """A stand-in t5_small train step: cross entropy, gradients, Adafactor (the trainer's step when it lands)."""
    model = network.Transformer(cfg)
    optimizer = optax.adafactor(learning_rate=1e-3)

    def loss_fn(params, batch):
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            batch["encoder_segment_ids"],
            batch["decoder_segment_ids"],
            batch["encoder_positions"],
            batch["decoder_positions"],
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
        weights = batch["decoder_loss_weights"]
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def measure_train_step(vocab_size: int, batches: list, steps: int) -> float:
    cfg = get_model_config("t5_small", vocab_size=embedding_rows(vocab_size), dropout_rate=0.0)
    params = network.init_params(cfg, jax.random.key(0))
    optimizer, step = train_step_fn(cfg)
    opt_state = optimizer.init(params)
    device_batches = [jax.tree.map(jnp.asarray, b) for b in batches[: steps + 2]]
    params, opt_state, loss = step(params, opt_state, device_batches[0])  # compile
    jax.block_until_ready(loss)
    rates = []
    for batch in device_batches[1 : steps + 1]:
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch)
        jax.block_until_ready(loss)
        rates.append(examples_in(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="multi30k_ende")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed (median)")
    args = parser.parse_args()

    task = TaskRegistry.get(args.task)
    vocab = task_vocabulary(task)
    pipeline_rate, batches = measure_pipeline(task, vocab, args.batch_size, args.batches)
    fill = np.mean([np.mean(b["decoder_target_tokens"] > 0) for b in batches])
    print(
        f"task {task.name}, batch {args.batch_size} rows, lengths {dict(task.lengths)}, target fill {100 * fill:.0f}%"
    )
    print(f"pipeline: {pipeline_rate:,.0f} packed examples/s ({args.batches} batches, 1 process, no workers)")
    step_rate = measure_train_step(vocab.vocab_size, batches, args.steps)
    print(f"t5_small train step (float32, {jax.devices()[0].platform}): consumes {step_rate:,.0f} packed examples/s")
    print(f"ratio pipeline / train step: {pipeline_rate / step_rate:.1f} (target >= 10)")


if __name__ == "__main__":
    main()
