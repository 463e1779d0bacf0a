import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_attention_benchmark_prints_rows_and_writes_a_trace(tmp_path):
    trace = tmp_path / "trace"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--frames", "1", "2",
         "--repeats", "1",
         "--heads", "2", "--dim", "16", "--blocks", "1", "3", "14", "--profile", str(trace)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["1"],
                                                                                        ["2"])]
    assert [row[1] for row in rows] == ["197", "393"]  # N = 196 T + 1
    for row in rows:
        N = int(row[1])
        bars = [i for i, token in enumerate(row) if token == "|"]
        limit = float(row[bars[2] + 1])  # the column after forward and forward+backward
        assert abs(limit - N / (4 * 14 + 1)) < 0.05
    assert "_BlockSparseAttention" in result.stdout  # the profile's operator table
    assert list(trace.glob("*.pt.trace.json"))


def test_flex_candidate_computes_the_sparse_edges():
    """FlexAttention's packed sequence and block mask give sparse_attention's output (forward: the
    CPU has no FlexAttention backward). N = 47, G = 14: blocks padded 14 -> 16 and a short last
    block."""
    import importlib.util
    import math

    import torch

    from sparse_attention import block_layout, sparse_attention

    spec = importlib.util.spec_from_file_location("attention_benchmark",
                                                  ROOT / "benchmarks" / "attention.py")
    # torch.compile looks it up
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    N, G = 47, 14
    q, k, v = (torch.randn(2, 3, 1 + N, 16) for _ in range(3))
    layout = block_layout(math.ceil(N / G), 1, 2, torch.Generator().manual_seed(1))
    mask, padded = bench.flex_block_mask(N, G, layout, tile=16)
    assert padded == 16
    with torch.no_grad():
        out = bench.flex_sparse_attention(q, k, v, G, layout, mask, padded)
        ref = sparse_attention(q, k, v, G, layout, impl="einsum")[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_order_probe_labels_follow_the_caption_order():
    """A clip's reversal swaps the events and their directions: the probe's labels must too."""
    import importlib.util

    from synthetic import COLOURS, DIRECTIONS, SHAPES

    spec = importlib.util.spec_from_file_location("order_probe",
                                                  ROOT / "experiments" / "order_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    forward = probe.attribute_labels("a red circle moves down, then a yellow triangle moves up")
    backward = probe.attribute_labels("a yellow triangle moves down, then a red circle moves up")
    colours, shapes, directions = list(COLOURS), list(SHAPES), list(DIRECTIONS)
    assert forward == [colours.index("red"), shapes.index("circle"), directions.index("down"),
                       colours.index("yellow"), shapes.index("triangle"), directions.index("up")]
    assert backward == forward[3:5] + [forward[2]] + forward[:2] + [forward[5]]
