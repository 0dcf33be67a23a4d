"""The task inspection command, end to end."""

from __future__ import annotations

from t5x_lite.data import inspect


def test_inspect_prints_examples_and_length_statistics(tmp_path, capsys):
    code = inspect.main(
        [
            "--task",
            "synthetic_numbers",
            "--split",
            "train",
            "--num",
            "2",
            "--stats_examples",
            "300",
            "--batch_size",
            "8",
            "--vocab_cache_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("--- example") == 2
    assert "inputs:  mean" in out and "p99" in out and "targets: mean" in out
    assert "examples per row" in out


def test_inspect_multi30k(shared_data, tmp_path, capsys):
    code = inspect.main(
        [
            "--task",
            "multi30k_ende",
            "--split",
            "test_2016_flickr",
            "--num",
            "1",
            "--stats_examples",
            "200",
            "--data_dir",
            str(shared_data),
            "--vocab_cache_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "split test_2016_flickr: 1,000 examples" in out
    assert "translate English to German:" in out


def test_inspect_unknown_task_is_one_line_error(capsys):
    assert inspect.main(["--task", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'no_such_task'; registered tasks:") and err.count("\n") == 1


def test_inspect_reports_bucketed_batches_and_their_padding(tmp_path, capsys):
    code = inspect.main(
        ["--task", "synthetic_numbers", "--split", "validation", "--num", "0", "--stats_examples", "50"]
        + ["--batch_tokens", "256", "--vocab_cache_dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "length-bucketed batches of <= 256 tokens (validation, one epoch)" in out
    fractions = [
        float(line.split(":")[-1].strip().rstrip("%")) for line in out.splitlines() if "padding fraction" in line
    ]
    assert len(fractions) == 2 and all(0.0 <= f < 50.0 for f in fractions)
