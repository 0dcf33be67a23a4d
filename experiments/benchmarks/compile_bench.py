"""Compile time of the train step against depth, with and without ``scan_layers``, and what ``remat_policy``
saves in compiled temporary memory.

With ``scan_layers=True`` the encoder and decoder stacks are one ``nn.scan`` each, so XLA compiles one layer
body whatever the depth; unrolled, it compiles every layer. The benchmark lowers and compiles the real train
step (AdamW, loss, gradients) of a T5 v1.0 model of t5_small width at 6+6 and at 24+24 layers, both ways, and
prints the times and the 24+24 / 6+6 ratios (target with scan: <= 1.5). Then it compiles t5_small's step with
remat none / minimal / full and prints XLA's ``memory_analysis()`` temporary bytes for each.

    python experiments/benchmarks/compile_bench.py            # about 80 s on 2 idle CPU cores (QUIET, 2026-12-02)
    python experiments/benchmarks/compile_bench.py --quick    # narrow model, under a minute

Hardware: any (compilation for the local backend). Result: see experiments/benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import optax  # noqa: E402

from experiments.benchmarks.train_bench import make_batch  # noqa: E402
from t5x_lite import partitioning, trainer  # noqa: E402
from t5x_lite.presets import get_model_config  # noqa: E402


def compile_step(cfg, batch_rows: int, input_len: int, target_len: int):
    """(seconds to lower + compile, compiled) of the train step of ``cfg``, built from shapes only."""
    optimizer = optax.adamw(1e-4)
    mesh, rules = partitioning.make_mesh((-1, 1, 1)), "data_parallel"
    shardings = trainer.state_shardings(cfg, optimizer, mesh, rules)
    abstract = jax.eval_shape(lambda key: trainer.create_train_state(cfg, optimizer, key), jax.random.key(0))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(8, batch_rows, input_len, target_len).items()
    }
    step = trainer.compile_train_step(cfg, optimizer, mesh, rules)
    start = time.perf_counter()
    with partitioning.activate(mesh, rules):
        compiled = step.lower(state, batch, jax.random.key(1)).compile()
    return time.perf_counter() - start, compiled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    width = dict(d_model=64, num_heads=4, d_kv=16, d_ff=128, vocab_size=512) if args.quick else {}
    rows, length = (2, 16) if args.quick else (8, 128)

    print("compile time of the train step (lower + compile), t5_small width, batch", rows, "x", length)
    seconds: dict[tuple[bool, int], float] = {}
    for scan in (True, False):
        for depth in (6, 24):
            cfg = get_model_config(
                "t5_small",
                num_encoder_layers=depth,
                num_decoder_layers=depth,
                scan_layers=scan,
                dropout_rate=0.1,
                **width,
            )
            seconds[scan, depth], _ = compile_step(cfg, rows, length, length)
            print(f"  scan_layers={scan!s:<5} {depth:>2}+{depth:<2} layers: {seconds[scan, depth]:6.1f} s", flush=True)
    for scan in (True, False):
        print(f"  ratio 24+24 / 6+6, scan_layers={scan}: {seconds[scan, 24] / seconds[scan, 6]:.2f}")

    print("compiled temporary memory of the train step by remat_policy (t5_small, scan_layers=True)")
    temporaries = {}
    for policy in ("none", "minimal", "full"):
        cfg = get_model_config("t5_small", scan_layers=True, remat_policy=policy, dropout_rate=0.1, **width)
        _, compiled = compile_step(cfg, rows, length, length)
        memory = compiled.memory_analysis()
        temporaries[policy] = memory.temp_size_in_bytes
        print(
            f"  remat_policy={policy:<8} temporaries {memory.temp_size_in_bytes / 2**20:8.1f} MiB, "
            f"arguments {memory.argument_size_in_bytes / 2**20:8.1f} MiB, outputs "
            f"{memory.output_size_in_bytes / 2**20:8.1f} MiB",
            flush=True,
        )
    for policy in ("minimal", "full"):
        saved = 1 - temporaries[policy] / temporaries["none"]
        print(f"  remat_policy={policy}: temporaries {100 * saved:.0f}% below remat none")


if __name__ == "__main__":
    main()
