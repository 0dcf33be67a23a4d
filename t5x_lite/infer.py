"""Decode lines of text (a file or stdin) with a training workdir's checkpoint, streaming the outputs.

    python -m t5x_lite.infer --workdir DIR [--input FILE|-] [--output FILE|-] [--beam_size 4 --alpha 0.6 |
        --temperature T --top_k K --top_p P] [--checkpoint_step N | --average_last N] [--batch_size 64]

Each input line is one example (the task's prefix is added, as in training); each output line is its decoded
text, in order, written as soon as its batch is decoded. A progress bar goes to stderr when it is a terminal.
Inputs longer than the task's input length are truncated, and their count is reported. The input is read a line
at a time (bounded memory); a line that is not UTF-8 stops the run with its line number.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, TextIO

import jax
import numpy as np
from absl import app, flags, logging

from t5x_lite import cli, evaluate, models
from t5x_lite.data import preprocessors
from t5x_lite.evaluation import LoadedModel, load_workdir

_INPUT = flags.DEFINE_string("input", "-", "Text file with one input per line; '-' reads stdin.")
_OUTPUT = flags.DEFINE_string("output", "-", "Where the outputs go, one line per input; '-' writes stdout.")


def read_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """The lines of a byte stream as text, one at a time (bounded memory); a line that is not UTF-8 is a
    ValueError naming ``name``, the line number and the byte offset within the line."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = raw[error.start : error.start + 4].rstrip(b"\r\n")
            raise ValueError(
                f"{name}: line {number} is not valid UTF-8 (byte {error.start} of the line: "
                f"{bad!r}); convert the file to UTF-8"
            ) from None


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
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
    try:
        _decode_into(loaded, lines, out, settings, batch_size, counter, bar)
    except BaseException:
        bar.leave = False  # an error message follows: the bar clears its line
        raise
    finally:
        bar.close()
    return counter


def _decode_into(loaded, lines, out, settings, batch_size, counter, bar) -> None:
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
    source = sys.stdin.buffer if _INPUT.value == "-" else open(_INPUT.value, "rb")  # noqa: SIM115
    sink = sys.stdout if _OUTPUT.value == "-" else open(_OUTPUT.value, "w", encoding="utf-8")  # noqa: SIM115
    try:
        lines = read_lines(source, "stdin" if _INPUT.value == "-" else _INPUT.value)
        progress = sys.stderr.isatty()  # a bar in a terminal; none in logs and pipes
        counter = infer_lines(loaded, lines, sink, settings, batch_size=evaluate._BATCH.value, progress=progress)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    if any(counter.truncated.values()):
        limit = loaded.task.lengths["inputs"]
        print(f"inputs longer than the task's {limit} tokens: {counter.summary()}", file=sys.stderr)


def _cli() -> None:
    cli.run(main)


if __name__ == "__main__":
    _cli()
