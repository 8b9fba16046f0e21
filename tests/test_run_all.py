"""bench/run_all.py: the table it prints, and --record appending it, dated, to a file without touching the rest."""
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import run_all  # noqa: E402  (bench/ on the path)

FAKE_ROWS = [("a benchmark", lambda: {"ratio": 1.5}, [("ratio", "speed vs its baseline", ">= 1.20", lambda x: x >= 1.2)])]


def test_the_table_prints_each_ratio_with_its_target_and_verdict(monkeypatch, capsys):
    monkeypatch.setattr(run_all, "ROWS", FAKE_ROWS)
    run_all.main([])
    assert "| a benchmark | speed vs its baseline | 1.50 | >= 1.20 | pass |" in capsys.readouterr().out


def test_record_appends_the_dated_table_and_keeps_what_the_file_held(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "ROWS", FAKE_ROWS)
    record = tmp_path / "performance.md"
    record.write_text("# Performance\n\nearlier runs\n")
    run_all.main(["--record", str(record)])
    text = record.read_text()
    assert text.startswith("# Performance\n\nearlier runs\n")
    assert f"## bench/run_all.py, {datetime.date.today().isoformat()}" in text
    assert "machine: " in text and "| a benchmark | speed vs its baseline | 1.50 | >= 1.20 | pass |" in text
