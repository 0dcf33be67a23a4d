"""Post-training quantization of a trained workdir into a new one that evaluate, infer and load_params accept.

    python -m t5x_lite.quantize --workdir DIR --out DIR_Q --scheme int8|int8_dynamic|fp8 [--keep_embeddings]
        [--checkpoint_step N | --average_last N]

Schemes (Qwix, per-channel scales): ``int8`` weight-only; ``int8_dynamic`` int8 weights and dynamically quantized
int8 activations; ``fp8`` float8_e4m3 weights and activations (where the backend runs float8 dots).
``--keep_embeddings`` keeps the token table and output projection in float. DIR_Q gets ``config.json`` (the model
with ``quantization`` set, and where it came from), ``vocab/``, one checkpoint (at the source's step) holding the
quantized parameters, each stack's layers stacked into one array per weight (``network.quantized_for_disk``: fewer
arrays, less Orbax metadata), and ``quantization.json`` (bytes before and after).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from t5x_lite import cli, derived_workdir, fileio, network, quantization
from t5x_lite.evaluation import load_workdir


def quantize_workdir(
    workdir: str,
    out: str,
    scheme: str,
    *,
    keep_embeddings: bool = False,
    checkpoint_step: int | None = None,
    average_last: int = 0,
) -> dict[str, Any]:
    """Quantize ``workdir``'s parameters into the new workdir ``out``; returns what ``quantization.json`` records."""
    quantization.check_scheme(scheme)
    if not scheme:
        raise ValueError("--scheme is empty; choose one of " + ", ".join(quantization.SCHEMES))
    derived_workdir.check_target(workdir, out, "quantize")
    loaded = load_workdir(workdir, checkpoint_step=checkpoint_step, average_last=average_last)
    if loaded.model_cfg.quantization:
        raise ValueError(f"{workdir} is already quantized ({loaded.model_cfg.quantization}); quantize its float source")
    if loaded.model_cfg.share_layers:
        raise ValueError(f"{workdir} shares its layers (share_layers=True); quantizing it is not supported yet")
    if loaded.model_cfg.lora_rank:
        raise ValueError(f"{workdir} holds LoRA adapters; merge them first (python -m t5x_lite.lora_merge)")
    params = loaded.params
    if loaded.model_cfg.scan_layers:  # Qwix quantizes per layer (quantized_for_disk stacks them again to save)
        params = network.unscan_params(params, loaded.model_cfg)
    # A QAT-trained model (``qat``) becomes the PTQ model it was trained to be: the same rounding, stored.
    changes = dict(quantization=scheme, quantize_embeddings=not keep_embeddings, scan_layers=False, qat="")
    cfg = loaded.model_cfg.replace(**changes)
    stored = network.quantized_for_disk(
        cfg, quantization.quantize_params(params, network.quantized_abstract_params(cfg))
    )
    record = {
        "source_workdir": str(fileio.workdir_path(workdir)),
        "source_steps": list(loaded.steps),
        "scheme": scheme,
        "quantize_embeddings": not keep_embeddings,
        "float_param_bytes": quantization.storage_bytes(loaded.params),
        "quantized_param_bytes": quantization.storage_bytes(stored),
    }
    record["ratio"] = record["quantized_param_bytes"] / record["float_param_bytes"]
    derived_workdir.write_derived_workdir(
        workdir,
        out,
        vocab=loaded.vocab,
        step=loaded.steps[-1],
        params=stored,
        model_changes=changes,
        record_name="quantization",
        record=record,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir (config.json, vocab/, checkpoints/)")
    parser.add_argument("--out", required=True, help="new workdir for the quantized model")
    parser.add_argument("--scheme", default="int8", choices=list(quantization.SCHEMES))
    parser.add_argument(
        "--keep_embeddings", action="store_true", help="keep the token table / output projection in float"
    )
    parser.add_argument("--checkpoint_step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--average_last", type=int, default=0, help="quantize the average of the last N checkpoints")
    args = parser.parse_args(argv)
    try:
        record = quantize_workdir(
            args.workdir,
            args.out,
            args.scheme,
            keep_embeddings=args.keep_embeddings,
            checkpoint_step=args.checkpoint_step,
            average_last=args.average_last,
        )
    except cli.EXPECTED_ERRORS as error:
        return cli.error_status(error)
    print(
        f"{record['scheme']}: {record['float_param_bytes']:,} -> {record['quantized_param_bytes']:,} parameter bytes "
        f"({100 * record['ratio']:.1f}%), steps {record['source_steps']} of {record['source_workdir']} -> {args.out}",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
