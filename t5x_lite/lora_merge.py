"""Merge a LoRA run's adapters into its base weights: a plain workdir of the base model's shape.

    python -m t5x_lite.lora_merge --workdir DIR --out DIR_M [--checkpoint_step N | --average_last N]

Every adapted weight becomes ``W + reshape(A @ B) * alpha / rank`` (t5x_lite.lora.merge); DIR_M gets
``config.json`` (``lora_rank`` 0), ``vocab/``, one checkpoint and ``lora_merge.json``. It decodes as fast as the
base model (no adapter matmuls) and ``evaluate``, ``infer``, ``quantize`` and ``init_from`` read it. A QLoRA run's
base is dequantized first, so its merged model is float (``python -m t5x_lite.quantize`` quantizes it again).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from t5x_lite import cli, derived_workdir, fileio, lora, quantization
from t5x_lite.evaluation import load_workdir


def merge_workdir(
    workdir: str, out: str, *, checkpoint_step: int | None = None, average_last: int = 0
) -> dict[str, Any]:
    """Merge ``workdir``'s adapters into the new workdir ``out``; returns what ``lora_merge.json`` records."""
    derived_workdir.check_target(workdir, out, "merge")
    loaded = load_workdir(workdir, checkpoint_step=checkpoint_step, average_last=average_last)
    cfg = loaded.model_cfg
    if not cfg.lora_rank:
        raise ValueError(f"{workdir} is not a LoRA run (its model has lora_rank=0): nothing to merge")
    # QLoRA: the quantized base is dequantized first; the merged model is float (quantize it again if wanted)
    params = quantization.dequantize_params(loaded.params)
    # an output adapter on a tied table becomes an untied output projection (the table still embeds the inputs);
    # a table's own adapter (lora_embed) and trainable rows (lora_rows) fold into the table
    untied = False
    if cfg.lora_output and cfg.tie_word_embeddings:
        params, untied = lora.untie_output_adapter(params, cfg.lora_rank, cfg.lora_alpha)
    params = lora.merge(params, cfg.lora_rank, cfg.lora_alpha, cfg.lora_rows)
    record = {
        "source_workdir": str(fileio.workdir_path(workdir)),
        "source_steps": list(loaded.steps),
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
        "adapter_params": lora.count_adapter_params(loaded.params),
        "base_quantization": cfg.quantization,
    }
    derived_workdir.write_derived_workdir(
        workdir,
        out,
        vocab=loaded.vocab,
        step=loaded.steps[-1],
        params=params,
        model_changes={
            "lora_rank": 0,
            "lora_alpha": None,
            "lora_output": False,
            "lora_embed": False,
            "lora_rows": [],
            "quantization": "",
            **({"tie_word_embeddings": False} if untied else {}),
        },
        record_name="lora_merge",
        record=record,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.lora_merge", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a LoRA training workdir (config.json, vocab/, checkpoints/)")
    parser.add_argument("--out", required=True, help="new workdir for the merged model")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--average_last", type=int, default=0, help="merge the average of the last N checkpoints")
    args = parser.parse_args(argv)
    try:
        record = merge_workdir(
            args.workdir, args.out, checkpoint_step=args.checkpoint_step, average_last=args.average_last
        )
    except cli.EXPECTED_ERRORS as error:
        return cli.error_status(error)
    print(
        f"merged {record['adapter_params']:,} adapter parameters (rank {record['lora_rank']}) of {args.workdir} "
        f"step {record['source_steps'][-1]} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
