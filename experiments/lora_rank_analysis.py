"""How much of full fine-tuning's weight change a LoRA adapter could hold: per weight, the share of the change
``W_finetuned - W_base`` (squared Frobenius norm) that its best rank-r approximation keeps (Eckart-Young: the r
largest singular values), and for the token table also the share held by its k most-changed rows.

    python experiments/lora_rank_analysis.py --base workdirs/multi30k --finetuned workdirs/multi30k_enfr_full

Why: a rank-r adapter can only ever represent a rank-r change. If full fine-tuning's change is spread over many
directions, no training recipe lets a small adapter reach it. Prints one line per weight (largest change first)
and the totals. Hardware: any CPU, a few seconds for Transformer-tiny.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import checkpoints  # noqa: E402

RANKS = (1, 4, 8, 16, 32)
ROWS = (300, 900, 2000)


def kept_by_rank(change: np.ndarray, ranks=RANKS) -> dict[int, float]:
    """Share of ``||change||^2`` in its best rank-r approximation, for each r (the matrix is [first axis, rest])."""
    matrix = change.reshape(change.shape[0], -1)
    energy = np.cumsum(np.linalg.svd(matrix, compute_uv=False) ** 2)
    return {r: float(energy[min(r, len(energy)) - 1] / energy[-1]) for r in ranks}


def kept_by_rows(change: np.ndarray, rows=ROWS) -> dict[int, float]:
    """Share of ``||change||^2`` in the k rows that changed most, for each k."""
    per_row = np.sort((change.reshape(change.shape[0], -1) ** 2).sum(axis=1))[::-1]
    return {k: float(per_row[:k].sum() / per_row.sum()) for k in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the workdir fine-tuning started from (init_from)")
    parser.add_argument("--finetuned", required=True, help="a full fine-tuning run of it (lora_rank=0)")
    parser.add_argument("--top", type=int, default=10, help="weights printed one by one, largest change first")
    args = parser.parse_args(argv)

    base = dict(jax.tree_util.tree_flatten_with_path(checkpoints.load_params(args.base))[0])
    tuned = dict(jax.tree_util.tree_flatten_with_path(checkpoints.load_params(args.finetuned))[0])
    if base.keys() != tuned.keys():
        raise SystemExit(f"{args.finetuned} does not hold the parameters of {args.base}: not a full fine-tuning of it")
    changes = {
        jax.tree_util.keystr(k): np.asarray(tuned[k], np.float64) - np.asarray(base[k], np.float64) for k in base
    }
    energy = {name: float((change**2).sum()) for name, change in changes.items()}
    total = sum(energy.values())
    matrices = {name: change for name, change in changes.items() if change.ndim >= 2}
    weighted = {r: 0.0 for r in RANKS}
    print(f"share of the whole change | share kept by rank {', '.join(map(str, RANKS))} | weight")
    for i, name in enumerate(sorted(matrices, key=energy.get, reverse=True)):
        kept = kept_by_rank(matrices[name])
        for r in RANKS:
            weighted[r] += kept[r] * energy[name]
        if i < args.top:
            shares = " ".join(f"{kept[r]:.2f}" for r in RANKS)
            print(f"{energy[name] / total:6.3f} | {shares} | {name}")
    print(f"matrices hold {sum(energy[n] for n in matrices) / total:.3f} of the change (the rest: norms, biases)")
    print(
        "whole model, share of the change a rank-r adapter on every matrix could hold: "
        + ", ".join(f"r={r} {weighted[r] / total:.3f}" for r in RANKS)
    )
    table = max((n for n in matrices if "embed" in n), key=energy.get, default=None)
    if table is not None:
        rows = kept_by_rows(matrices[table])
        print(
            f"{table}: share of its change in its most-changed rows: "
            + ", ".join(f"{k} rows {rows[k]:.3f}" for k in ROWS)
        )


if __name__ == "__main__":
    main()
