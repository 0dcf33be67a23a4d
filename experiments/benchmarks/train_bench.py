"""Train-step throughput of t5x_lite against Hugging Face's PyTorch T5 on the same config, batch and machine.

Both sides train the same T5 (default: t5_small v1.0 shapes, 60.5M parameters, vocabulary 32,128) with AdamW
(lr 1e-4, weight decay 0.01), on the same random batch of ``--batch`` rows of ``--input_len`` input and
``--target_len`` target tokens, with dropout ``--dropout`` (t5x_lite draws its dropout bits with the opt-in
``dropout_generator="hash"`` unless ``--dropout_generator threefry``; PyTorch with its own Philox generator).
One timed "round" runs ``--steps`` steps of each side, alternating t5x_lite and Hugging Face, so that
drifting machine load hits both alike. The figure per side is the median over rounds of the mean step time.
Compilation (JAX) and the first eager steps (PyTorch) are excluded and reported apart.

    python experiments/benchmarks/train_bench.py                    # CPU: fp32, t5_small, batch 8, 128/128
    python experiments/benchmarks/train_bench.py --quick            # tiny model, seconds: checks it runs
    python experiments/benchmarks/train_bench.py --dtype bfloat16 --model t5_v1_1_base --batch 128 \\
        --input_len 512 --target_len 114 --dropout 0 --attention_kernel cudnn --skip_hf   # GPU: bf16 MFU alone

Hardware: any; the CPU figures in NOTES.md are from the 2-core development machine. Time: about 4 minutes on 2
CPU cores with the defaults. Result: the last line is ``ratio (t5x_lite / Hugging Face target tokens/s): X``
(see experiments/benchmarks/NOTES.md for the measured figures and what changed them). For GPU sweeps over
models, batches and attention kernels, ``gpu_bench.py`` (experiments/results/gpu.md has the figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from t5x_lite import flops, host_memory, partitioning, trainer  # noqa: E402
from t5x_lite.presets import get_model_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--target_len", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1, help="T5's default; both sides use it")
    parser.add_argument(
        "--dropout_generator",
        default="hash",
        choices=["hash", "threefry"],
        help="t5x_lite's dropout bits: hash (layers.hash_bits, opt-in, 1.33x on this CPU) or threefry (flax's)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activations (t5x_lite)")
    parser.add_argument("--remat", default="none", choices=["none", "minimal", "full"])
    parser.add_argument("--scan", action="store_true", help="scan_layers=True")
    parser.add_argument(
        "--attention_kernel", default="einsum", choices=["einsum", "xla", "cudnn"], help="t5x_lite; needs --dropout 0"
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip_hf", action="store_true", help="t5x_lite alone (e.g. on a GPU)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check that the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.input_len, args.target_len, args.steps, args.rounds = "t5_tiny", 4, 32, 32, 2, 2
    return args


def make_batch(vocab: int, batch: int, input_len: int, target_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random full-length rows: inputs and targets end in EOS (1); the decoder input is the shifted target."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, (batch, input_len), dtype=np.int32)
    targets = rng.integers(2, vocab, (batch, target_len), dtype=np.int32)
    inputs[:, -1] = targets[:, -1] = 1
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets, np.float32),
    }


class JaxSide:
    """t5x_lite's jit-compiled, state-donating train step on a 1-device mesh."""

    def __init__(self, args, batch):
        overrides = dict(
            dropout_rate=args.dropout,
            dropout_generator=args.dropout_generator,
            dtype=args.dtype,
            remat_policy=args.remat,
            scan_layers=args.scan,
            attention_kernel=args.attention_kernel,
        )
        self.cfg = get_model_config(args.model, **overrides)
        optimizer = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
        mesh, rules = partitioning.make_mesh((-1, 1, 1)), "data_parallel"
        self.state = trainer.create_train_state(self.cfg, optimizer, jax.random.key(0), mesh, rules)
        self.step_fn = trainer.compile_train_step(self.cfg, optimizer, mesh, rules)
        self.batch = partitioning.host_local_to_global(batch, mesh, rules)
        self.rng = jax.random.key(1)
        self.mesh, self.rules = mesh, rules
        start = time.perf_counter()
        with partitioning.activate(mesh, rules):
            self.compiled = self.step_fn.lower(self.state, self.batch, self.rng).compile()
        self.compile_seconds = time.perf_counter() - start

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready(metrics["loss"])
        self.loss = float(metrics["loss"])
        return (time.perf_counter() - start) / steps


class TorchSide:
    """transformers' T5ForConditionalGeneration in train mode with torch.optim.AdamW (foreach)."""

    def __init__(self, args, batch, jax_cfg):
        import torch
        import transformers

        from t5x_lite.convert import hf_config_from

        torch.manual_seed(0)
        hf_kwargs = hf_config_from(jax_cfg)
        hf_kwargs.update(dropout_rate=args.dropout, tie_word_embeddings=jax_cfg.tie_word_embeddings)
        self.torch = torch
        self.model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_kwargs)).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
        self.inputs = {
            "input_ids": torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
            "attention_mask": torch.ones(batch["encoder_input_tokens"].shape, dtype=torch.long),
            "decoder_input_ids": torch.tensor(batch["decoder_input_tokens"], dtype=torch.long),
            "labels": torch.tensor(batch["decoder_target_tokens"], dtype=torch.long),
        }
        start = time.perf_counter()
        self.run(2)  # first steps allocate optimizer state and warm the allocator
        self.warmup_seconds = time.perf_counter() - start

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.model(**self.inputs).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    args = parse_args(argv)
    host_memory.keep_freed_memory()  # off, as the train command runs t5_small (T5X_LITE_KEEP_FREED_MEMORY=1: on)
    jax_side_cfg = get_model_config(args.model)
    batch = make_batch(jax_side_cfg.vocab_size, args.batch, args.input_len, args.target_len)
    target_tokens, all_tokens = args.batch * args.target_len, args.batch * (args.input_len + args.target_len)
    print(f"{args.model}, batch {args.batch} x ({args.input_len} in, {args.target_len} out), dropout {args.dropout}, ")
    print(
        f"  t5x_lite dtype {args.dtype}, dropout bits {args.dropout_generator}, remat {args.remat}, "
        f"scan_layers {args.scan}, "
        f"attention {args.attention_kernel}; device {jax.devices()[0]}"
    )
    ours = JaxSide(args, batch)
    print(f"t5x_lite: compiled in {ours.compile_seconds:.1f} s")
    theirs = None
    if not args.skip_hf:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(f"PyTorch {torch.__version__}: {torch.get_num_threads()} threads; JAX on {os.cpu_count()} CPU cores")
        theirs = TorchSide(args, batch, ours.cfg)
        print(f"Hugging Face: first 2 steps {theirs.warmup_seconds:.1f} s")
    ours.run(1)  # one untimed step after compilation
    times: dict[str, list[float]] = {"t5x_lite": [], "Hugging Face": []}
    for round_index in range(args.rounds):
        times["t5x_lite"].append(ours.run(args.steps))
        if theirs is not None:
            times["Hugging Face"].append(theirs.run(args.steps))
        line = ", ".join(f"{name} {values[-1] * 1e3:.0f} ms" for name, values in times.items() if values)
        print(f"round {round_index + 1}/{args.rounds}: mean step time {line}", flush=True)

    step_flops = flops.train_flops(ours.cfg, args.batch, args.input_len, args.target_len)
    peak, peak_source = flops.peak_flops_per_device()
    print(f"model FLOPs per step {step_flops:.3g}; peak {peak:.3g} FLOP/s ({peak_source})")
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    for name, seconds in medians.items():
        side = ours if name == "t5x_lite" else theirs
        print(
            f"{name:>12}: step {seconds * 1e3:8.1f} ms | target tokens/s {target_tokens / seconds:9.0f} | "
            f"all tokens/s {all_tokens / seconds:9.0f} | MFU {100 * step_flops / seconds / peak:5.1f}% | "
            f"loss {side.loss:.3f}"
        )
    if theirs is not None:
        print(f"ratio (t5x_lite / Hugging Face target tokens/s): {medians['Hugging Face'] / medians['t5x_lite']:.2f}")


if __name__ == "__main__":
    main()
