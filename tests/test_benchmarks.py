import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_attention_benchmark_prints_rows_and_writes_a_trace(tmp_path):
    trace = tmp_path / "trace"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--frames", "1", "2", "--repeats", "1",
         "--heads", "2", "--dim", "16", "--blocks", "1", "3", "14", "--profile", str(trace)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[1] for row in rows] == ["197", "393"]  # N = 196 T + 1
    for row in rows:
        N = int(row[1])
        bars = [i for i, token in enumerate(row) if token == "|"]
        limit = float(row[bars[2] + 1])  # the column after forward and forward+backward
        assert abs(limit - N / (4 * 14 + 1)) < 0.05
    assert "_BlockSparseAttention" in result.stdout  # the profile's operator table
    assert list(trace.glob("*.pt.trace.json"))
