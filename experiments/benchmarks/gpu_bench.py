"""bf16 train-step throughput and MFU of t5x_lite on one accelerator, over a list of models, batches and kernels.

Each run is ``train_bench.py``'s t5x_lite side (AdamW, random full-length rows, the jit-compiled step that donates
its state) with bf16 activations and float32 parameters, timed as the median over ``--rounds`` of the mean step
time of ``--steps`` steps after one untimed step. All runs share one process, so JAX starts once. A run that fails
(out of memory, a kernel the device refuses) is recorded with its error and the sweep goes on; no run starts once
``--budget_s`` has passed. The device memory of a run is XLA's ``memory_analysis()`` of its compiled step
(arguments + outputs - donated + temporaries), which says which batch would fit a smaller card.

    python experiments/benchmarks/gpu_bench.py --output experiments/results/gpu_runs.json \\
        --runs t5_v1_1_small:128:einsum,t5_v1_1_base:128:cudnn

A run is ``model:batch:attention_kernel[:remat]``. Hardware: one GPU (or TPU); on a CPU only ``--quick`` is
sensible. Time: about 30 to 60 s a run on an H100-class GPU, mostly compilation. Result: one line per run and a
Markdown table (step time, target and all tokens/s, MFU against the device's dense bf16 peak, memory);
experiments/results/gpu.md records the measured table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import types

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
    bench_args = types.SimpleNamespace(
        model=run["model"],
        dropout=0.0,  # T5 v1.1 pre-trains without dropout; the fused kernels have none
        dtype=args.dtype,
        remat=run["remat"],
        scan=False,
        attention_kernel=run["kernel"],
    )
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
    record = dict(
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
        device_gib=None,
        loss=round(side.loss, 4),
    )
    used = device_bytes(side.compiled)
    record["device_gib"] = None if used is None else round(used / 2**30, 2)
    return record


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


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [parse_run(spec) for spec in args.runs.split(",") if spec.strip()]
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {args.dtype}, dropout 0, ", end="")
    print(f"{args.input_len} input / {args.target_len} target tokens; {args.rounds} rounds x {args.steps} steps")
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
