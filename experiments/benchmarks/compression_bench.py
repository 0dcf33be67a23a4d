"""Compressed copies of a trained translation workdir: BLEU, parameters, bytes and decoding speed against float32.

    ../shared/tools/quiet-run -- python experiments/benchmarks/compression_bench.py --workdir workdirs/multi30k \\
        --out experiments/results/compression --split test_2016_flickr --beam_size 4 --alpha 1.0 --average_last 3 \\
        [--extra pruned=workdirs/multi30k_pruned_ft:3 --extra shared_layers=workdirs/multi30k_shared:3]

For float32, each ``--schemes`` entry (``python -m t5x_lite.quantize`` into ``WORKDIR_quantized/<scheme>``,
reused when present) and each ``--extra NAME=WORKDIR[:AVERAGE_LAST]`` (a pruned, distilled or shared-layer model
trained separately) it prints and writes to ``OUT.json`` / ``OUT.md`` / ``OUT.png`` (BLEU against bytes):
- the split's task metrics (tokenized lowercased BLEU for Multi30k) with the same beam search;
- parameter bytes (arrays and scales) and the on-disk bytes of a parameters-only Orbax checkpoint;
- decoding speed: the split decoded once more after a warm-up batch has compiled, in sentences/s and generated
  target tokens/s (the predictions re-tokenized, plus EOS), in the same process one after another.
The last line is ``ratio (int8 / float32 decoding tokens/s): X`` for the first row after float32. Hardware: any; the
figures in docs/compression.md are from 2 CPU cores. Time: about 1-2 minutes per model for Multi30k on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import (  # noqa: E402
    host_memory,
    lora,
    models,
    network,
    optimizers,
    partitioning,
    quantization,
    quantize,
    train,
    trainer,
)
from t5x_lite.checkpoints import Checkpointer  # noqa: E402
from t5x_lite.evaluation import LoadedModel, evaluate_loaded, load_workdir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained (float) workdir")
    parser.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--schemes", default="int8,int8_dynamic", help=f"comma-separated: {list(quantization.SCHEMES)}")
    parser.add_argument("--keep_embeddings", action="store_true")
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--average_last", type=int, default=1, help="checkpoints averaged before quantizing")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_examples", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], help="NAME=WORKDIR[:AVERAGE_LAST], repeatable")
    parser.add_argument(
        "--transfer",
        action="append",
        default=[],
        help="NAME=WORKDIR[:AVERAGE_LAST] of a fine-tuning run on another task (full or LoRA): its own table",
    )
    parser.add_argument("--step_rows", type=int, default=128, help="rows of the timed train-step batch")
    parser.add_argument("--step_length", type=int, default=32, help="tokens per row (inputs and targets)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per model (after 2 warm-up)")
    parser.add_argument(
        "--disk_of_preset",
        default="",
        help="also print float32 and int8 on-disk bytes of this preset, randomly initialized (e.g. t5_small): "
        "Orbax's fixed per-array metadata weighs less on a larger model",
    )
    return parser.parse_args(argv)


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def params_on_disk(params, cfg) -> int:
    """On-disk bytes of ``params`` alone in the Orbax layout their command writes: training checkpoints for float
    models (and QLoRA's stored base), ``python -m t5x_lite.quantize``'s stacked layers for a PTQ model."""
    if cfg.quantization and not cfg.lora_rank:
        stored = network.quantized_for_disk(cfg, params)
    else:
        stored = quantization.to_storage(params)
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(tmp, save_every_steps=1, keep=1, async_save=False)
        checkpointer.maybe_save(1, {"params": stored}, None, force=True)
        checkpointer.wait()
        checkpointer.close()
        return disk_bytes(os.path.join(tmp, "checkpoints"))


def preset_disk_bytes(name: str) -> dict:
    """On-disk bytes of a preset's float32 parameters (random init, unscanned) and of their int8 PTQ."""
    from t5x_lite import presets

    cfg = presets.get_model_config(name, scan_layers=False)
    params = jax.tree.map(jnp.asarray, network.init_params(cfg, jax.random.key(0)))
    abstract = network.quantized_abstract_params(cfg.replace(quantization="int8"))
    quantized = quantization.quantize_params(params, abstract)
    row = {
        "model": name,
        "float32_disk_bytes": params_on_disk(params, cfg),
        "int8_disk_bytes": params_on_disk(quantized, cfg.replace(quantization="int8")),
    }
    row["int8_disk_ratio"] = row["int8_disk_bytes"] / row["float32_disk_bytes"]
    print(
        f"{name} (random init): float32 {row['float32_disk_bytes']:,} B, int8 {row['int8_disk_bytes']:,} B on disk "
        f"({100 * row['int8_disk_ratio']:.1f}%)",
        flush=True,
    )
    return row


def count_parameters(stored) -> int:
    """Weights in a stored tree; a quantized weight's ``{qvalue, scale}`` counts its values, not its scales."""
    if isinstance(stored, dict):
        if "qvalue" in stored:
            return int(stored["qvalue"].size)
        return sum(count_parameters(child) for child in stored.values())
    return int(stored.size)


def train_cost(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    """Trainable parameters, optimizer-state bytes and the mean time of a train step of the model with its run's
    optimizer (and teacher, for a distilled student) on a fixed ``step_rows`` x ``step_length`` batch."""
    cfg, config = loaded.model_cfg, loaded.config
    optimizer = optimizers.make_optimizer(config)
    if cfg.lora_rank:
        optimizer = lora.adapters_only(optimizer)
    params = quantization.to_storage(loaded.params) if cfg.quantization else loaded.params  # QLoRA trains on storage
    opt_state = jax.jit(optimizer.init)(params)
    trainable = (
        lora.count_adapter_params(params) if cfg.lora_rank else int(sum(np.size(x) for x in jax.tree.leaves(params)))
    )
    state_bytes = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(opt_state)))
    mesh = partitioning.make_mesh((-1, 1, 1))
    # A distilled student's step runs its teacher too (config.distill_teacher): timed as it trained.
    distillation, teacher_params = train._teacher(ml_collections.ConfigDict(config), loaded.vocab, verbose=False)
    step = trainer.compile_train_step(
        cfg,
        optimizer,
        mesh,
        "data_parallel",
        label_smoothing=config.get("label_smoothing", 0.0),
        loss_chunk_tokens=config.get("loss_chunk_tokens", 0),
        distillation=distillation,
        teacher_params=teacher_params,
    )
    tokens = jax.random.randint(jax.random.key(0), (args.step_rows, args.step_length), 2, loaded.vocab.vocab_size)
    batch = {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": jnp.pad(tokens[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jnp.ones(tokens.shape, jnp.float32),
    }
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    state = jax.device_put(state, trainer.state_shardings(cfg, optimizer, mesh, "data_parallel"))
    with partitioning.activate(mesh, "data_parallel"):
        for _ in range(2):
            state, out = step(state, batch, jax.random.key(1))
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, out = step(state, batch, jax.random.key(1))
        jax.block_until_ready(out)
    return {
        "trainable_parameters": trainable,
        "optimizer_state_bytes": state_bytes,
        "step_seconds": (time.perf_counter() - start) / args.steps,
    }


def measure(name: str, loaded: LoadedModel, args: argparse.Namespace, split: str | None = None) -> dict:
    split = split or args.split
    settings = models.DecodeSettings(beam_size=args.beam_size, alpha=args.alpha)
    evaluate_loaded(loaded, split, settings, args.batch_size, max_examples=args.batch_size)  # compile
    start = time.perf_counter()
    result = evaluate_loaded(loaded, split, settings, args.batch_size, max_examples=args.max_examples)
    seconds = time.perf_counter() - start
    tokens = sum(len(loaded.vocab.encode(text)) + 1 for text in result.predictions)
    row = {
        "model": name,
        "split": split,
        "metrics": {k: v for k, v in result.metrics.items()},
        "parameters": count_parameters(quantization.to_storage(loaded.params)),
        "param_bytes": quantization.storage_bytes(quantization.to_storage(loaded.params)),
        "disk_bytes": params_on_disk(loaded.params, loaded.model_cfg),
        "decode_seconds": seconds,
        "sentences_per_s": len(result.predictions) / seconds,
        "tokens_per_s": tokens / seconds,
    }
    if not loaded.model_cfg.quantization or loaded.model_cfg.lora_rank:  # PTQ models are not trained; QLoRA is
        row.update(train_cost(loaded, args))
    metric = "tok_bleu" if "tok_bleu" in row["metrics"] else sorted(row["metrics"])[0]
    step = f"  step {row['step_seconds']:.3f} s" if "step_seconds" in row else ""
    print(
        f"{name:>14}: {metric} {row['metrics'][metric]:.2f}  params {row['param_bytes']:,} B"
        f"  disk {row['disk_bytes']:,} B  decode {row['sentences_per_s']:.1f} sent/s, {row['tokens_per_s']:.0f} tok/s"
        + step,
        flush=True,
    )
    return row


def _named_workdirs(specs: list[str]):
    for spec in specs:
        name, _, source = spec.partition("=")
        workdir, _, average = source.partition(":")
        yield name, workdir, load_workdir(workdir, average_last=int(average or 0))


def transfer_split(loaded: LoadedModel, split: str) -> str:
    """The split a transfer run is scored on: ``split`` when its task has it (Multi30k), else ``test`` (TED)."""
    return split if split in loaded.task.splits else "test"


def checkpoint_bytes(workdir: str, step: int) -> int:
    """On-disk bytes of the run's own checkpoint at ``step`` (a LoRA run's: its adapters and their Adam state)."""
    return disk_bytes(os.path.join(workdir, "checkpoints", str(step)))


def plot(rows: list, metric: str, args: argparse.Namespace) -> None:
    """OUT.png: the split's metric against on-disk bytes, one labelled point per model (needs the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[plot]'): no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row["disk_bytes"] / 2**20, row["metrics"][metric])
        ax.annotate(row["model"], (row["disk_bytes"] / 2**20, row["metrics"][metric]), fontsize=8)
    ax.set_xlabel("checkpoint size on disk (MiB)")
    ax.set_ylabel(f"{args.split} {metric}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


def _step(row: dict) -> str:
    return f"{row['step_seconds']:.3f}" if "step_seconds" in row else "-"


def main(argv=None) -> None:
    args = parse_args(argv)
    host_memory.keep_freed_memory(True)  # as configs/multi30k.py asks the train command (t5x_lite/host_memory.py)
    schemes = [s for s in args.schemes.split(",") if s]
    for scheme in schemes:
        quantization.check_scheme(scheme)
    rows = [measure("float32", load_workdir(args.workdir, average_last=args.average_last), args)]
    for scheme in schemes:
        suffix = "_keep_embeddings" if args.keep_embeddings else ""
        out = os.path.join(args.workdir.rstrip("/") + "_quantized", scheme + suffix)
        if not os.path.isdir(os.path.join(out, "checkpoints")):
            quantize.quantize_workdir(
                args.workdir, out, scheme, keep_embeddings=args.keep_embeddings, average_last=args.average_last
            )
        rows.append(measure(scheme + suffix, load_workdir(out), args))
    rows += [measure(name, loaded, args) for name, _, loaded in _named_workdirs(args.extra)]
    transfer = [
        measure(name, loaded, args, transfer_split(loaded, args.split))
        | {"task": loaded.task.name, "checkpoint_bytes": checkpoint_bytes(workdir, loaded.steps[-1])}
        for name, workdir, loaded in _named_workdirs(args.transfer)
    ]
    base = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["param_bytes"] / base["param_bytes"]
        row["disk_ratio"] = row["disk_bytes"] / base["disk_bytes"]
        row["speed_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.default_backend()}",
        "command": " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "workdir": args.workdir,
        "split": args.split,
        "decoding": {"beam_size": args.beam_size, "alpha": args.alpha, "average_last": args.average_last},
        "rows": rows,
        "transfer_rows": transfer,
        "train_step_batch": [args.step_rows, args.step_length],
        "preset_disk": preset_disk_bytes(args.disk_of_preset) if args.disk_of_preset else None,
    }
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    metric = "tok_bleu" if "tok_bleu" in base["metrics"] else sorted(base["metrics"])[0]
    lines = [
        f"| model | {args.split} {metric} | parameters | parameter bytes | on disk | decoding tokens/s (beam "
        f"{args.beam_size}) | train step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = row["metrics"][metric] - base["metrics"][metric]
        lines.append(
            f"| {row['model']} | {row['metrics'][metric]:.2f} ({delta:+.2f}) | {row['parameters']:,} | "
            f"{row['param_bytes']:,} "
            f"({100 * row['bytes_ratio']:.1f}%) | {row['disk_bytes']:,} ({100 * row['disk_ratio']:.1f}%) | "
            f"{row['tokens_per_s']:.0f} ({row['speed_ratio']:.2f}x) | {_step(row)} |"
        )
    if transfer:
        lines += [
            "",
            f"| fine-tuning run | task | split | {metric} | trainable parameters | optimizer state bytes | "
            "checkpoint on disk | train step (s) | decoding tokens/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in transfer:
            lines.append(
                f"| {row['model']} | {row['task']} | {row['split']} | {row['metrics'][metric]:.2f} | "
                f"{row['trainable_parameters']:,} "
                f"({100 * row['trainable_parameters'] / row['parameters']:.1f}%) | {row['optimizer_state_bytes']:,} | "
                f"{row['checkpoint_bytes']:,} | {_step(row)} | {row['tokens_per_s']:.0f} |"
            )
    if record["preset_disk"]:
        disk = record["preset_disk"]
        lines += [
            "",
            f"int8 checkpoint of {disk['model']} (random init), on disk: {disk['int8_disk_bytes']:,} B against "
            f"{disk['float32_disk_bytes']:,} B float32 ({100 * disk['int8_disk_ratio']:.1f}%)",
        ]
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, metric, args)
    if len(rows) > 1:
        print(f"ratio ({rows[1]['model']} / float32 decoding tokens/s): {rows[1]['speed_ratio']:.2f}")


if __name__ == "__main__":
    main()
