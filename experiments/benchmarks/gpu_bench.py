"""bf16 train-step throughput and MFU of t5x_lite on one accelerator, over a list of models, batches and kernels.

Each run is ``train_bench.py``'s t5x_lite side (AdamW, random full-length rows, the jit-compiled step that donates
its state) with bf16 activations and float32 parameters, timed as the median over ``--rounds`` of the mean step
time of ``--steps`` steps after one untimed step. All runs share one process, so JAX starts once. A run that fails
(out of memory, a kernel the device refuses) is recorded with its error and the sweep goes on; no run starts once
``--budget_s`` has passed. The device memory of a run is XLA's ``memory_analysis()`` of its compiled step
(arguments + outputs - donated + temporaries), which says which batch would fit a smaller card.

    python experiments/benchmarks/gpu_bench.py --output experiments/results/gpu_runs.json \\
        --runs t5_v1_1_small:128:einsum,t5_v1_1_base:128:cudnn

A run is ``model:batch:attention_kernel[:remat]``. First, each fused kernel in the list is compared with the einsum
path on a small model over ragged rows (logits and gradients; the timed runs use full-length rows).

``--matmul_peak 8192`` times a bf16 8192^3 matmul instead: the chip's measured peak, beside its datasheet's.

Hardware: one GPU (or TPU); on a CPU only ``--quick`` is sensible. Time: about 2 minutes a run on an H200, of which
compilation is 22 to 34 s. Result: one line per run and a Markdown table (step time, target and all tokens/s, MFU
against the device's dense bf16 peak, memory); experiments/results/gpu.md records the measured table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import train_bench  # noqa: E402

from t5x_lite import flops  # noqa: E402

DEFAULT_RUNS = (  # most telling first: a sweep cut by --budget_s keeps them
    "t5_v1_1_base:128:cudnn,t5_v1_1_base:128:einsum,t5_v1_1_small:256:cudnn,t5_v1_1_small:256:einsum,"
    "t5_v1_1_base:256:cudnn,t5_v1_1_base:64:cudnn,t5_v1_1_small:128:cudnn,t5_v1_1_base:256:einsum"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated model:batch:kernel[:remat]")
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--target_len", type=int, default=114)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=420.0, help="start no run after this many seconds")
    parser.add_argument("--output", default="", help="write the runs as JSON here")
    parser.add_argument("--quick", action="store_true", help="t5_tiny, 32/32 tokens: checks that the script runs")
    parser.add_argument(
        "--matmul_peak",
        type=int,
        default=0,
        metavar="N",
        help="time an N x N x N matmul in --dtype instead (8192: the H200's measured peak in gpu.md) and exit",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.input_len, args.target_len, args.steps, args.rounds = (
            "t5_tiny:4:einsum,t5_tiny:4:xla",
            32,
            32,
            2,
            2,
        )
    return args


def parse_run(spec: str) -> dict:
    """``model:batch:kernel[:remat]`` -> the fields of one run; a malformed spec says what a run looks like."""
    parts = spec.strip().split(":")
    if len(parts) not in (3, 4) or not parts[1].isdigit():
        raise SystemExit(f"--runs: {spec!r} is not model:batch:attention_kernel[:remat], e.g. t5_v1_1_base:128:cudnn")
    return dict(model=parts[0], batch=int(parts[1]), kernel=parts[2], remat=parts[3] if len(parts) == 4 else "none")


def device_bytes(compiled) -> int | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    used = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return int(used + memory.temp_size_in_bytes)


def measure(run: dict, args: argparse.Namespace) -> dict:
    """Compile and time one run; the returned record carries its figures or its error."""
    # train_bench's own arguments, so that an option it gains has its default here too
    bench_args = train_bench.parse_args(
        ["--model", run["model"], "--dropout", "0", "--dtype", args.dtype, "--remat", run["remat"]]
        + ["--attention_kernel", run["kernel"]]
    )  # dropout 0: T5 v1.1 pre-trains without dropout; the fused kernels have none
    cfg = train_bench.get_model_config(run["model"])
    batch = train_bench.make_batch(cfg.vocab_size, run["batch"], args.input_len, args.target_len)
    start = time.perf_counter()
    side = train_bench.JaxSide(bench_args, batch)
    setup_seconds = time.perf_counter() - start - side.compile_seconds  # state initialization, mesh, batch
    first_step_seconds = side.run(1)
    times = [side.run(args.steps) for _ in range(args.rounds)]
    seconds = statistics.median(times)
    peak, peak_source = flops.peak_flops_per_device()
    step_flops = flops.train_flops(side.cfg, run["batch"], args.input_len, args.target_len)
    used = device_bytes(side.compiled)
    return dict(
        run,
        setup_s=round(setup_seconds, 1),
        compile_s=round(side.compile_seconds, 1),
        first_step_s=round(first_step_seconds, 2),
        step_ms=round(seconds * 1e3, 2),
        step_ms_rounds=[round(t * 1e3, 2) for t in times],
        target_tokens_per_s=round(run["batch"] * args.target_len / seconds),
        all_tokens_per_s=round(run["batch"] * (args.input_len + args.target_len) / seconds),
        sequences_per_s=round(run["batch"] / seconds, 1),
        mfu=round(step_flops / seconds / peak, 4),
        model_tflops_per_s=round(step_flops / seconds / 1e12, 1),
        peak_source=peak_source,
        device_gib=None if used is None else round(used / 2**30, 2),
        loss=round(side.loss, 4),
    )


def ragged_check(kernel: str, dtype: str) -> dict:
    """Logits and gradients of ``kernel`` against the einsum path on a small T5 v1.1 over ragged, right-padded rows
    (one of them all padding): the case the timed runs, on full-length rows, never exercise."""
    import jax.numpy as jnp
    import numpy as np

    from t5x_lite import network

    cfg = network.TransformerConfig(
        vocab_size=128, d_model=64, num_heads=4, d_kv=16, d_ff=96, num_encoder_layers=2, num_decoder_layers=2,
        mlp_activation="gated-gelu", tie_word_embeddings=False, rescale_logits=False, dropout_rate=0.0, dtype=dtype,
    )  # fmt: skip
    params = network.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(2, 128, (4, 16)), rng.integers(2, 128, (4, 8))
    for row, (input_len, target_len) in enumerate([(16, 8), (9, 5), (2, 2), (0, 0)]):
        inputs[row, input_len:], targets[row, target_len:] = 0, 0
    inputs, targets = jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)
    weights = (targets > 0).astype(jnp.float32)[..., None]

    def run(kernel_name):
        model = network.Transformer(cfg.replace(attention_kernel=kernel_name))
        logits = lambda p: model.apply({"params": p}, inputs, targets, targets)
        loss = lambda p: jnp.sum(jax.nn.log_softmax(logits(p)) * weights) / weights.sum()
        return jax.jit(lambda p: (logits(p) * weights, jax.grad(loss)(p)))(params)

    (ref_logits, ref_grads), (logits, grads) = run("einsum"), run(kernel)
    pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    grad_scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_grads))
    return dict(
        check=f"ragged rows, {kernel} vs einsum, {dtype}",
        finite=bool(jnp.isfinite(logits).all()) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)),
        max_logit_diff=round(float(jnp.max(jnp.abs(logits - ref_logits))), 5),
        max_logit=round(float(jnp.max(jnp.abs(ref_logits))), 3),
        max_grad_diff=round(grad_diff, 6),
        max_grad=round(grad_scale, 5),
    )


def table(records: list[dict]) -> str:
    lines = [
        "| model | batch | attention | remat | step ms | target tok/s | all tok/s | seq/s | MFU | GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['kernel']} | {r['remat']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['kernel']} | {r['remat']} | {r['step_ms']:.1f} | "
            f"{r['target_tokens_per_s']:,} | {r['all_tokens_per_s']:,} | {r['sequences_per_s']:,} | "
            f"{100 * r['mfu']:.1f}% | {r['device_gib']} | {r['compile_s']} |"
        )
    return "\n".join(lines)


def matmul_peak(n: int, dtype: str, repeats: int = 20) -> dict:
    """What the chip really does: TFLOP/s of an ``n^3`` matmul in ``dtype``, the best of 3 rounds of ``repeats``."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        begin = time.perf_counter()
        for _ in range(repeats):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - begin) / repeats)
    return dict(check=f"{n}^3 {dtype} matmul", seconds=best, tflops=2 * n**3 / best / 1e12)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.matmul_peak:
        device = jax.devices()[0]
        print(json.dumps(dict(matmul_peak(args.matmul_peak, args.dtype), device=device.device_kind)))
        return
    runs = [parse_run(spec) for spec in args.runs.split(",") if spec.strip()]
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {args.dtype}, dropout 0, ", end="")
    print(f"{args.input_len} input / {args.target_len} target tokens; {args.rounds} rounds x {args.steps} steps")
    for kernel in sorted({run["kernel"] for run in runs} - {"einsum"}):
        try:
            print(json.dumps(ragged_check(kernel, args.dtype)), flush=True)
        except Exception as error:  # noqa: BLE001 - the timed runs still tell something
            print(json.dumps(dict(check=f"ragged rows, {kernel}", error=" ".join(str(error).split())[:300])))
    start, records = time.perf_counter(), []
    for run in runs:
        if time.perf_counter() - start > args.budget_s:
            records.append(dict(run, error=f"not run: the {args.budget_s:.0f} s budget was spent"))
            continue
        try:
            record = measure(run, args)
        except Exception as error:  # noqa: BLE001 - an out-of-memory or refused kernel is a result too
            message = " ".join(str(error).split())[:300]
            record = dict(run, error=f"{type(error).__name__}: {message}")
        records.append(record)
        print(json.dumps(record), flush=True)
        gc.collect()
    print(table(records))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__, args=vars(args), runs=records), f, indent=1)


if __name__ == "__main__":
    main()
