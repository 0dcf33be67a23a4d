"""Nothing executes on load: checkpoints, vocabularies and configs are read without pickle, and a pickled payload
in a Hugging Face ``pytorch_model.bin`` is refused by torch's weights-only loader before it can run."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from t5x_lite import checkpoints, convert, evaluation, train
from t5x_lite.data.vocab import Vocabulary
from tests import tiny_config


def test_loading_a_workdir_never_unpickles(tmp_path, monkeypatch):
    config = tiny_config.get_config("steps=2")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used while loading a workdir")

    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        if hasattr(pickle, name):
            monkeypatch.setattr(pickle, name, refuse)
    loaded = evaluation.load_workdir(workdir)  # config.json, vocab/, the Orbax checkpoint
    assert loaded.steps == [2]
    assert checkpoints.load_params(workdir)
    assert Vocabulary.load(os.path.join(workdir, "vocab")).vocab_size == loaded.vocab.vocab_size


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_in_pytorch_model_bin_is_refused_and_never_runs(tmp_path, capsys):
    pytest.importorskip("torch", reason="the dev extra (torch) reads legacy .bin checkpoints")
    hf_dir, marker = tmp_path / "hf", tmp_path / "ran"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with open(hf_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"shared.weight": _Payload(str(marker))}, f)
    assert convert.main(["from-hf", "--hf_dir", str(hf_dir), "--workdir", str(tmp_path / "out")]) == 2
    assert not marker.exists()  # the payload never ran
    err = capsys.readouterr().err
    assert "pytorch_model.bin holds more than tensors, which the weights-only loader refuses to run" in err
