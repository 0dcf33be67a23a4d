"""Decode lines of text (a file or stdin) with a training workdir's checkpoint, streaming the outputs.

    python -m t5x_lite.infer --workdir DIR [--input FILE|-] [--output FILE|-] [--beam_size 4 --alpha 0.6 |
        --temperature T --top_k K --top_p P] [--checkpoint_step N | --average_last N] [--batch_size 64]

Each input line is one example (the task's prefix is added, as in training); each output line is its decoded
text, in order, written as soon as its batch is decoded. A progress bar goes to stderr. Inputs longer than the
task's input length are truncated, and their count is reported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

import jax
import numpy as np
from absl import app, flags, logging

from t5x_lite import evaluate, models
from t5x_lite.data import preprocessors
from t5x_lite.evaluation import LoadedModel, load_workdir

_INPUT = flags.DEFINE_string("input", "-", "Text file with one input per line; '-' reads stdin.")
_OUTPUT = flags.DEFINE_string("output", "-", "Where the outputs go, one line per input; '-' writes stdout.")


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_inputs(
    loaded: LoadedModel, texts: Sequence[str], rows: int, counter: preprocessors.TruncationCounter
) -> np.ndarray:
    """[rows, input length] int32 encoder ids of ``texts`` (prefixed, EOS-terminated, truncated, zero-padded)."""
    length = loaded.task.lengths["inputs"]
    tokens = np.zeros((rows, length), np.int32)
    for row, text in enumerate(texts):
        ids = loaded.task.tokenize({"inputs": text, "targets": ""}, loaded.vocab, counter=counter)["inputs"]
        tokens[row, : len(ids)] = ids
    return tokens


def infer_lines(
    loaded: LoadedModel,
    lines: Iterable[str],
    out: TextIO,
    settings: models.DecodeSettings,
    *,
    batch_size: int,
    progress: bool = False,
) -> preprocessors.TruncationCounter:
    """Decode ``lines`` in batches of ``batch_size`` (the last one padded to keep one compilation) into ``out``."""
    from tqdm import tqdm

    counter = preprocessors.TruncationCounter()
    bar = tqdm(desc="infer", unit="line", disable=not progress, file=sys.stderr)
    for texts in _batches(lines, batch_size):
        tokens = encode_inputs(loaded, texts, batch_size, counter)
        decoded, _ = models.predict_batch(
            loaded.model_cfg,
            loaded.params,
            jax.numpy.asarray(tokens),
            settings,
            max_decode_length=loaded.task.lengths["targets"],
            vocab_limit=loaded.vocab.vocab_size,
            eos_id=loaded.vocab.eos_id,
        )
        for text in loaded.vocab.decode_batch(np.asarray(decoded)[: len(texts)]):
            out.write(loaded.task.postprocess(text).replace("\n", " ") + "\n")
        out.flush()
        bar.update(len(texts))
    bar.close()
    return counter


def main(argv: Sequence[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs each restore step (INFO) and read-only access (WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not evaluate._WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if evaluate._BATCH.value < 1:
        raise app.UsageError(f"--batch_size={evaluate._BATCH.value} must be at least 1")
    settings = evaluate.decode_settings_from_flags()
    loaded = load_workdir(
        evaluate._WORKDIR.value,
        checkpoint_step=evaluate._STEP.value,
        average_last=evaluate._AVERAGE.value,
        task=evaluate._TASK.value,
    )
    source = sys.stdin if _INPUT.value == "-" else open(_INPUT.value, encoding="utf-8")  # noqa: SIM115
    sink = sys.stdout if _OUTPUT.value == "-" else open(_OUTPUT.value, "w", encoding="utf-8")  # noqa: SIM115
    try:
        counter = infer_lines(loaded, source, sink, settings, batch_size=evaluate._BATCH.value, progress=True)
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    if any(counter.truncated.values()):
        limit = loaded.task.lengths["inputs"]
        print(f"inputs longer than the task's {limit} tokens: {counter.summary()}", file=sys.stderr)


def _cli() -> None:
    app.run(main)


if __name__ == "__main__":
    _cli()
