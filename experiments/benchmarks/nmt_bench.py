"""Multi30k En->De training throughput of t5x_lite against fairseq: same data, model, recipe and tokens per update.

Both sides train Wu et al. (2021)'s Transformer-tiny as ``configs/multi30k.py`` defines it (4+4 post-LN layers,
d_model 128, FFN 256, 4 heads, shared embeddings, dropout 0.3 on embeddings and sublayer outputs, Adam (0.9, 0.98)
at lr 0.005 with 2,000 warm-up updates, label smoothing 0.1) on the same training text: the official lowercased
tokenized Multi30k train split, cut into the same SentencePiece BPE pieces (t5x_lite's vocabulary; fairseq gets
the pieces as text and binarizes them with ``fairseq-preprocess --joined-dictionary``). fairseq batches with
``--max-tokens`` (default 4096); t5x_lite's length-bucketed ``batch_tokens`` is set so that its mean number of real
(non-padding) target tokens per update matches fairseq's epoch mean within 1% (the script checks 5%).

fairseq runs in its own virtual environment, in a process of its own (``fairseq_driver.py``, fairseq-train's
loop), kept alive so that the two sides take turns: each round times ``--updates`` updates of each side, after
``--warmup`` untimed updates each (and, for t5x_lite, the ahead-of-time compilation of every batch shape). The
figure per side is its real target tokens over its seconds, summed over all rounds; timing includes the input
pipeline on both sides.

    python experiments/benchmarks/nmt_bench.py --fairseq_python V/bin/python     # both sides (about 7 minutes)
    python experiments/benchmarks/nmt_bench.py                                   # t5x_lite alone, and says so
    python experiments/benchmarks/nmt_bench.py --ablations    # t5x_lite alone, undoing each speed change in turn
                                                               # (each row in a fresh process; about 15 minutes)

Set up fairseq once (about 3 minutes), outside the repository:

    python3 -m venv V && V/bin/pip install torch==2.13.0 cython "numpy<2" sentencepiece && \\
        V/bin/pip install --no-build-isolation fairseq-fixed==0.12.3.1

Run it on a quiet machine: ``../shared/tools/quiet-run -- python experiments/benchmarks/nmt_bench.py ...``.
Hardware: any CPU machine (figures in experiments/benchmarks/NOTES.md: the 2-core development machine). The last
line is ``ratio (t5x_lite / fairseq target tokens/s): X``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import config_files, host_memory, network, optimizers, partitioning, train, trainer  # noqa: E402
from t5x_lite.data import bucketing, pipeline  # noqa: E402
from t5x_lite.data.tasks import TaskRegistry, task_vocabulary  # noqa: E402

MULTI30K = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "multi30k.py"
)

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fairseq_driver.py")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fairseq_python", default="", help="the Python of a virtual environment with fairseq")
    parser.add_argument("--updates", type=int, default=60, help="timed updates per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates per side before the rounds")
    parser.add_argument("--max_tokens", type=int, default=4096, help="fairseq --max-tokens")
    parser.add_argument("--batch_tokens", type=int, default=0, help="t5x_lite; 0: match fairseq's target tokens")
    parser.add_argument("--workdir", default="/tmp/t5x_lite_nmt_bench", help="fairseq's binarized data (cached)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ablations", action="store_true", help="t5x_lite alone, undoing each speed change")
    parser.add_argument("--ablation_row", type=int, default=-1, help=argparse.SUPPRESS)  # one row, in this process
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------- data


def write_fairseq_data(task, vocab, workdir: str, fairseq_python: str) -> str:
    """The train split as SentencePiece pieces, binarized by fairseq-preprocess; returns the data-bin folder."""
    import sentencepiece as spm

    folder = os.path.join(workdir, vocab.fingerprint[:12])
    data_bin = os.path.join(folder, "bin")
    if os.path.isfile(os.path.join(data_bin, "train.en-de.de.bin")):
        return data_bin
    os.makedirs(folder, exist_ok=True)
    pieces = spm.SentencePieceProcessor()
    pieces.LoadFromSerializedProto(vocab.model_bytes)
    source = task.get_source("train")
    src, tgt = (task.source_options[key] for key in ("src_lang", "tgt_lang"))
    with open(os.path.join(folder, f"train.{src}"), "w") as fs, open(os.path.join(folder, f"train.{tgt}"), "w") as ft:
        for index in range(len(source)):
            record = source[index]
            fs.write(" ".join(pieces.EncodeAsPieces(record["inputs"])) + "\n")
            ft.write(" ".join(pieces.EncodeAsPieces(record["targets"])) + "\n")
    command = [fairseq_python, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt]
    command += ["--trainpref", os.path.join(folder, "train"), "--destdir", data_bin, "--joined-dictionary"]
    subprocess.run(command + ["--workers", "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return data_bin


def fairseq_arguments(config, vocab_size: int, data_bin: str, max_tokens: int, seed: int) -> list[str]:
    """fairseq-train's arguments for the config's model (the train command's TransformerConfig of it, for a
    vocabulary of ``vocab_size`` ids) and recipe."""
    model = train.model_config(config, vocab_size)
    return [
        data_bin,
        "--arch", "transformer",
        "--encoder-layers", str(model.num_encoder_layers), "--decoder-layers", str(model.num_decoder_layers),
        "--encoder-embed-dim", str(model.d_model), "--decoder-embed-dim", str(model.d_model),
        "--encoder-ffn-embed-dim", str(model.d_ff), "--decoder-ffn-embed-dim", str(model.d_ff),
        "--encoder-attention-heads", str(model.num_heads), "--decoder-attention-heads", str(model.num_heads),
        "--share-all-embeddings", "--dropout", str(model.dropout_rate),
        "--attention-dropout", str(model.attention_dropout), "--activation-dropout", str(model.activation_dropout),
        "--optimizer", "adam", "--adam-betas", f"({config.b1 if 'b1' in config else 0.9}, {config.b2})",
        "--adam-eps", str(config.eps), "--weight-decay", str(config.weight_decay), "--clip-norm", "0.0",
        "--lr", str(config.learning_rate), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(config.warmup_steps),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(config.label_smoothing),
        "--max-tokens", str(max_tokens), "--seed", str(seed), "--cpu", "--no-save", "--disable-validation",
        "--log-format", "none", "--num-workers", "1",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- sides


class FairseqSide:
    """fairseq-train's loop in its own process (fairseq_driver.py), run N updates at a time."""

    def __init__(self, python: str, arguments: list[str]):
        command = [python, DRIVER, "--", *arguments]
        print("fairseq:", " ".join(shlex.quote(part) for part in command), flush=True)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        while True:  # the driver's replies are JSON lines; anything else a library prints is passed through
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"fairseq's driver exited with status {self.process.wait()} (see its stderr above)")
            if line.startswith("{"):
                return json.loads(line)
            print(f"fairseq: {line.rstrip()}", flush=True)

    def run(self, updates: int) -> dict:
        self.process.stdin.write(f"run {updates}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


class T5xLiteSide:
    """``t5x_lite.train``'s step on the config's length-bucketed batches (input pipeline included)."""

    def __init__(self, config, task, vocab, plan=None):
        """With ``plan`` None the config's fixed batches (``batch_size`` rows, packed or padded) are used."""
        self.mesh, self.rules = partitioning.make_mesh(tuple(config.mesh_shape)), config.partitioning
        model_cfg = train.model_config(config, vocab.vocab_size)
        optimizer = optimizers.make_optimizer(config, logical_axes=network.param_logical_axes(model_cfg))
        self.plan = plan
        data = pipeline.train_dataset(
            task,
            vocab,
            batch_size=config.batch_size,
            seed=config.seed,
            pack=config.pack if plan is None else False,
            batch_tokens=config.batch_tokens if plan is not None else 0,
            plan=plan,
            prefetch=config.prefetch_batches,
        )
        self.iterator = iter(data)
        self.state = trainer.create_train_state(
            model_cfg, optimizer, jax.random.key(config.seed), self.mesh, self.rules
        )
        step = trainer.compile_train_step(
            model_cfg,
            optimizer,
            self.mesh,
            self.rules,
            label_smoothing=config.label_smoothing,
            loss_chunk_tokens=config.loss_chunk_tokens,
        )
        started = time.perf_counter()
        self.step = step
        if plan is not None:
            shapes = pipeline.bucket_batch_shapes(plan, task.lengths)
            self.step = trainer.precompile_train_step(step, self.state, shapes, self.mesh, self.rules)
        self.compile_seconds = time.perf_counter() - started
        self.parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        self.rng = jax.random.key(config.seed)

    def run(self, updates: int) -> dict:
        tokens = sentences = 0
        losses = []
        start = time.perf_counter()
        with partitioning.activate(self.mesh, self.rules):
            for _ in range(updates):
                batch = next(self.iterator)
                targets = batch["decoder_target_tokens"]
                tokens += int(np.sum(targets > 0))
                sentences += int(np.sum(targets[:, 0] > 0))
                global_batch = partitioning.host_local_to_global(batch, self.mesh, self.rules)
                self.state, metrics = self.step(self.state, global_batch, self.rng)
                losses.append(metrics["loss"])
            jax.block_until_ready(self.state)
        seconds = time.perf_counter() - start
        loss = float(np.mean(jax.device_get(losses)))
        return {"updates": updates, "seconds": seconds, "target_tokens": tokens, "sentences": sentences, "loss": loss}


def plans_by_batch_tokens(task, vocab, config, row_multiple: int, candidates) -> dict:
    """``{batch_tokens: (plan, mean real target tokens per batch over an epoch)}``, tokenizing the split once."""
    base = pipeline.bucket_plan(task, vocab, batch_tokens=max(candidates), row_multiple=row_multiple, seed=config.seed)
    targets = np.asarray([len(base.examples[i]["targets"]) for i in range(len(base.examples))])
    plans = {}
    for batch_tokens in candidates:
        plan = bucketing.BucketPlan.build(
            base.lengths,
            batch_tokens=batch_tokens,
            boundaries=base.boundaries,
            row_multiple=row_multiple,
            seed=config.seed,
            examples=base.examples,
        )
        means = [targets[indices[indices >= 0]].sum() for _, indices in plan.epoch(0)]
        plans[batch_tokens] = (plan, float(np.mean(means)))
    return plans


# ---------------------------------------------------------------------------------------------------------- main


ABLATIONS = (
    ("before: packed rows 128 x 64, prefix, raw text, T5 dropout placement, logits materialized", {}),
    ("+ fairseq's dropout placement (attention and activation dropout 0)", {"placement": True}),
    ("+ length-bucketed batches of <= 4,096 tokens (tok/ text, no prefix)", {"placement": True, "bucketed": True}),
    ("+ output projection fused into the loss", {"placement": True, "bucketed": True, "fused": True}),
    ("+ hash dropout bits (= configs/multi30k.py)", {"placement": True, "bucketed": True, "fused": True, "hash": 1}),
)


def ablation_config(seed: int, placement=False, bucketed=False, fused=False, hash=False):
    """configs/multi30k.py with the speed changes of NOTES.md undone, cumulatively (the ablation rows)."""
    config = config_files.load_config(f"{MULTI30K}:seed={seed}")
    overrides = {"dropout_rate": 0.3, "dropout_generator": "hash" if hash else "threefry"}
    if not placement:  # T5's placement: dropout on attention weights and MLP activations too
        overrides.update(attention_dropout_rate=0.3, activation_dropout_rate=0.3)
    config.model_overrides = overrides
    if not bucketed:  # the earlier config: packed rows of 64 tokens, 128 a batch, the prefixed raw-text task
        config.task, config.pack, config.batch_tokens, config.batch_size = "multi30k_ende", True, 0, 128
    config.loss_chunk_tokens = 1024 if fused else 0
    return config


def run_ablations(args) -> None:
    """Each row of ABLATIONS in a fresh process of its own (no thread, cache or memory left by an earlier row)."""
    for row in range(len(ABLATIONS)):
        command = [sys.executable, os.path.abspath(__file__), "--ablation_row", str(row), "--seed", str(args.seed)]
        command += ["--rounds", str(args.rounds), "--updates", str(args.updates), "--warmup", str(args.warmup)]
        subprocess.run(command, check=True)


def run_ablation_row(args) -> None:
    """One row of ABLATIONS: warm-up, then ``rounds`` x ``updates`` timed updates of t5x_lite alone."""
    name, options = ABLATIONS[args.ablation_row]
    config = ablation_config(args.seed, **options)
    task = TaskRegistry.get(config.task)
    vocab = task_vocabulary(task)
    plan = None
    if config.batch_tokens:
        plan = pipeline.bucket_plan(task, vocab, batch_tokens=config.batch_tokens, seed=config.seed)
    side = T5xLiteSide(config, task, vocab, plan)
    side.run(args.warmup)
    tokens = seconds = 0.0
    for _ in range(args.rounds):
        result = side.run(args.updates)
        tokens, seconds = tokens + result["target_tokens"], seconds + result["seconds"]
    print(
        f"{name}: {tokens / seconds:,.0f} target tokens/s ({seconds / (args.rounds * args.updates):.3f} s/update, "
        f"{tokens / (args.rounds * args.updates):,.0f} target tokens/update)",
        flush=True,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    host_memory.keep_freed_memory(True)  # as configs/multi30k.py asks the train command (t5x_lite/host_memory.py)
    if args.ablation_row >= 0:
        run_ablation_row(args)
        return
    if args.ablations:
        run_ablations(args)
        return
    config = config_files.load_config(f"{MULTI30K}:seed={args.seed}")
    task = TaskRegistry.get(config.task)
    vocab = task_vocabulary(task)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; task {task.name}, vocabulary {vocab.vocab_size}")

    fairseq = None
    if args.fairseq_python:
        data_bin = write_fairseq_data(task, vocab, args.workdir, args.fairseq_python)
        fairseq = FairseqSide(
            args.fairseq_python,
            fairseq_arguments(config, vocab.vocab_size, data_bin, args.max_tokens, args.seed),
        )
        print(f"fairseq: {fairseq.info}", flush=True)
    else:
        print("no --fairseq_python: timing t5x_lite alone (no ratio)", flush=True)

    mesh = partitioning.make_mesh(tuple(config.mesh_shape))
    row_multiple = int(np.lcm(config.bucket_row_multiple, partitioning.batch_shards(mesh, config.partitioning)))
    reference = fairseq.info["mean_target_tokens_per_update"] if fairseq is not None else None
    if args.batch_tokens:
        candidates = [args.batch_tokens]
    elif reference is not None:  # t5x_lite's budget whose target tokens per update are closest to fairseq's
        candidates = list(range(int(reference * 0.9) // 64 * 64, int(reference * 1.6), 64))
    else:
        candidates = [config.batch_tokens]
    plans = plans_by_batch_tokens(task, vocab, config, row_multiple, candidates)
    config.batch_tokens = min(plans, key=lambda b: abs(plans[b][1] - reference) if reference else 0)
    plan, ours_mean = plans[config.batch_tokens]
    ours = T5xLiteSide(config, task, vocab, plan)
    print(
        f"t5x_lite: batch_tokens {config.batch_tokens}, {ours_mean:.0f} target tokens per update (epoch mean), "
        f"{ours.parameters:,} parameters, {len(plan.shapes())} batch shapes compiled in {ours.compile_seconds:.0f} s",
        flush=True,
    )
    if reference is not None:
        gap = ours_mean / reference - 1
        print(f"target tokens per update: t5x_lite {ours_mean:.0f}, fairseq {reference:.0f} ({100 * gap:+.1f}%)")
        if abs(gap) > 0.05:
            raise SystemExit(f"the sides differ by {100 * gap:+.1f}% in target tokens per update; set --batch_tokens")

    ours.run(args.warmup)
    if fairseq is not None:
        fairseq.run(args.warmup)
    totals = {"t5x_lite": [0, 0.0], "fairseq": [0, 0.0]}
    try:
        for round_index in range(args.rounds):
            order = [("t5x_lite", ours), ("fairseq", fairseq)]
            if round_index % 2:
                order.reverse()
            line = []
            for name, side in order:
                if side is None:
                    continue
                result = side.run(args.updates)
                totals[name][0] += result["target_tokens"]
                totals[name][1] += result["seconds"]
                line.append(
                    f"{name} {result['target_tokens'] / result['seconds']:,.0f} tokens/s "
                    f"({result['seconds'] / result['updates']:.3f} s/update, loss {result['loss']:.3f})"
                )
            print(f"round {round_index + 1}: " + "; ".join(line), flush=True)
    finally:
        if fairseq is not None:
            fairseq.close()

    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items() if seconds}
    for name, rate in rates.items():
        tokens, seconds = totals[name]
        print(f"{name}: {rate:,.0f} target tokens/s ({tokens:,} tokens in {seconds:.1f} s)")
    if "fairseq" in rates:
        print(f"ratio (t5x_lite / fairseq target tokens/s): {rates['t5x_lite'] / rates['fairseq']:.2f}")


if __name__ == "__main__":
    main()
