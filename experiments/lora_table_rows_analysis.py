"""How much of a fine-tuning's gain its token table carries, and in which rows: greedy BLEU of hybrid models.

    python experiments/lora_table_rows_analysis.py --base BASE_WORKDIR --finetuned FULL_FT_WORKDIR \\
        [--frequent 300,600] [--changed 600,2000] [--split validation]

Every hybrid keeps the fine-tuned run's weights and puts in the base's token table, with the fine-tuned rows of
(a) the N most frequent target tokens of the fine-tuning data, (b) the N most frequent target and N most frequent
input tokens, (c) the N rows whose change is largest; plus the base's and the fine-tuned table whole. It says what a
LoRA run with trainable token rows (``lora_rows``) could at most get from its rows (docs/compression.md). Needs a
shared token table (``share_embeddings``, as Transformer-tiny has). About a minute per hybrid on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import checkpoints, models  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402
from t5x_lite.evaluation import evaluate_loaded, load_workdir  # noqa: E402


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the workdir the fine-tuning started from (init_from)")
    parser.add_argument("--finetuned", required=True, help="a full fine-tuning workdir")
    parser.add_argument("--frequent", default="300,600", help="row counts chosen by token frequency")
    parser.add_argument("--changed", default="600,2000", help="row counts chosen by the size of their change")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)

    tuned = load_workdir(args.finetuned)
    if "token_embedder" not in tuned.params:
        raise SystemExit(f"{args.finetuned}: no shared token table (share_embeddings=False); this analysis needs one")
    base_table = np.asarray(checkpoints.load_params(args.base)["token_embedder"]["embedding"])
    tuned_table = np.asarray(tuned.params["token_embedder"]["embedding"])

    def score(name: str, rows) -> None:
        table = base_table.copy()
        table[list(rows)] = tuned_table[list(rows)]
        params = dict(jax.tree.map(np.asarray, tuned.params))
        params["token_embedder"] = {"embedding": table}
        result = evaluate_loaded(
            dataclasses.replace(tuned, params=params), args.split, models.DecodeSettings(beam_size=1), args.batch_size
        )
        print(
            f"{name:<48} rows {len(rows):>5}  {args.split} greedy tok_bleu {result.metrics['tok_bleu']:.2f}", flush=True
        )

    score("fine-tuned table", range(len(tuned_table)))
    score("base table", [])
    changed = np.argsort(-np.linalg.norm(tuned_table - base_table, axis=1), kind="stable")
    for count in _counts(args.frequent):
        targets = pipeline.most_frequent_tokens(tuned.task, tuned.vocab, count)
        inputs = pipeline.most_frequent_tokens(tuned.task, tuned.vocab, count, feature="inputs")
        score(f"{count} most frequent target tokens", targets)
        score(f"{count} most frequent target + {count} input tokens", sorted(set(targets) | set(inputs)))
    for count in _counts(args.changed):
        score(f"{count} most changed rows", changed[:count])


if __name__ == "__main__":
    main()
