"""experiments/pretraining_report.py: one point now, the other later, and the gain of pre-training from both."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import pretraining_report  # noqa: E402


def _sweep(root):
    for point in pretraining_report.POINTS.values():
        (root / point / "checkpoints").mkdir(parents=True)
        (root / point / "sweep_point.json").write_text(json.dumps({"command": ["train", point]}))


def test_points_scored_apart_combine_into_one_gain(tmp_path, monkeypatch):
    _sweep(tmp_path / "pair")
    scores = {"scratch=True": 20.0, "scratch=False": 23.5}
    calls = []

    def fake_report(args, argv):
        calls.append(args.workdir)
        assert args.train_command == f"train {os.path.basename(args.workdir)}"  # the sweep's argv, as one line
        rouge = scores[os.path.basename(args.workdir)]
        return {"task": "aeslc", "selection": {"metric": "rougeL"}, "test": {"test": {"metrics": {"rougeL": rouge}}}}

    monkeypatch.setattr(pretraining_report, "report", fake_report)
    out = str(tmp_path / "results" / "aeslc")
    os.makedirs(os.path.dirname(out))
    base = ["--sweep_root", str(tmp_path / "pair"), "--out", out, "--metric", "rougeL"]
    with pytest.raises(SystemExit, match="unknown bogus"):
        pretraining_report.main([*base, "--points", "bogus"])
    pretraining_report.main([*base, "--points", "scratch"])  # the other point is still training
    assert len(calls) == 1 and calls[0].endswith("scratch=True") and os.path.isfile(out + "_scratch.json")
    assert not os.path.exists(out + ".json")
    pretraining_report.main([*base, "--points", "pretrained"])  # the scratch record is read back, not re-scored
    assert len(calls) == 2
    with open(out + ".json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["test_gain_of_pretraining"] == {"test": {"rougeL": pytest.approx(3.5)}}
    assert summary["scratch"]["test"]["test"]["metrics"]["rougeL"] == 20.0
