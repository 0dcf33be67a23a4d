"""Structured pruning of a trained workdir into a smaller one that evaluate, infer and init_from accept.

    python -m t5x_lite.prune --workdir DIR --out DIR_P --ffn_fraction 0.5 --heads_fraction 0.34
        [--checkpoint_step N | --average_last N]

Removes at least ``ffn_fraction`` of every MLP's units and ``heads_fraction`` of every attention block's heads,
the least important by weight norms (t5x_lite.pruning). DIR_P gets ``config.json`` (the model with the new
``d_ff``, ``num_heads`` and ``d_kv``), ``vocab/``, one checkpoint and ``pruning.json``. Fine-tune it with
``python -m t5x_lite.train ... --config.init_from=DIR_P`` and the model overrides this command prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import numpy as np

from t5x_lite import cli, derived_workdir, fileio, pruning
from t5x_lite.evaluation import load_workdir


def count_params(params: Any) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def prune_workdir(
    workdir: str,
    out: str,
    *,
    ffn_fraction: float,
    heads_fraction: float,
    checkpoint_step: int | None = None,
    average_last: int = 0,
) -> dict[str, Any]:
    """Prune ``workdir``'s parameters into the new workdir ``out``; returns what ``pruning.json`` records."""
    pruning.pruned_count(1 << 20, ffn_fraction, "FFN units")  # range checks before any loading
    pruning.pruned_count(1 << 20, heads_fraction, "attention heads")
    if not ffn_fraction and not heads_fraction:
        raise ValueError("--ffn_fraction and --heads_fraction are both 0: nothing to prune")
    derived_workdir.check_target(workdir, out, "prune")
    loaded = load_workdir(workdir, checkpoint_step=checkpoint_step, average_last=average_last)
    params, cfg = pruning.prune_params(
        loaded.params, loaded.model_cfg, ffn_fraction=ffn_fraction, heads_fraction=heads_fraction
    )
    changes = {"d_ff": cfg.d_ff, "num_heads": cfg.num_heads, "d_kv": cfg.d_kv}
    record = {
        "source_workdir": str(fileio.workdir_path(workdir)),
        "source_steps": list(loaded.steps),
        "ffn_fraction": ffn_fraction,
        "heads_fraction": heads_fraction,
        "d_ff": [loaded.model_cfg.d_ff, cfg.d_ff],
        "num_heads": [loaded.model_cfg.num_heads, cfg.num_heads],
        "params": [count_params(loaded.params), count_params(params)],
        "model_overrides": changes,
    }
    derived_workdir.write_derived_workdir(
        workdir,
        out,
        vocab=loaded.vocab,
        step=loaded.steps[-1],
        params=params,
        model_changes=changes,
        record_name="pruning",
        record=record,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir (config.json, vocab/, checkpoints/)")
    parser.add_argument("--out", required=True, help="new workdir for the pruned model")
    parser.add_argument("--ffn_fraction", type=float, default=0.0, help="fraction of FFN units to remove per layer")
    parser.add_argument("--heads_fraction", type=float, default=0.0, help="fraction of heads to remove per block")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--average_last", type=int, default=0, help="prune the average of the last N checkpoints")
    args = parser.parse_args(argv)
    try:
        record = prune_workdir(
            args.workdir,
            args.out,
            ffn_fraction=args.ffn_fraction,
            heads_fraction=args.heads_fraction,
            checkpoint_step=args.checkpoint_step,
            average_last=args.average_last,
        )
    except cli.EXPECTED_ERRORS as error:
        return cli.error_status(error)
    before, after = record["params"]
    overrides = " ".join(f"--config.model_overrides.{k}={v}" for k, v in record["model_overrides"].items())
    print(
        f"d_ff {record['d_ff'][0]} -> {record['d_ff'][1]}, heads {record['num_heads'][0]} -> {record['num_heads'][1]}, "
        f"parameters {before:,} -> {after:,} ({100 * after / before:.1f}%) -> {args.out}\n"
        f"fine-tune: python -m t5x_lite.train --config CONFIG --config.init_from={args.out} {overrides}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
