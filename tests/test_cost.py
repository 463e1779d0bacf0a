"""Tests of benchmarks/cost.py: the cost table of dense against sparse models (Table 2)."""
import pytest
import torch

from benchmarks import cost


def test_cost_table_on_meta_device():
    rows = cost.cost_table("tiny", "none", torch.device("cpu"), frames_list=(4,))
    by = {r["sparsity"]: r for r in rows}
    assert by["hybrid"]["gflops"] < by["node"]["gflops"] < by["dense"]["gflops"]
    for row in rows:  # the count from tokens and edges agrees with the operator-level count
        assert abs(row["gflops_predicted"] / row["gflops"] - 1) < 0.05
    assert by["edge"]["edges"] < by["dense"]["edges"]
    assert by["hybrid"]["memory_plain"] < by["dense"]["memory_plain"]
    # the fused kernel keeps no N x N softmax
    assert by["dense"]["memory_fused"] < by["dense"]["memory_plain"]


@pytest.mark.slow
def test_cost_table_times_the_timing_preset(capsys):
    rows = cost.cost_table("tiny", "tiny", torch.device("cpu"), frames_list=(4,), repeats=1)
    by = {r["sparsity"]: r for r in rows}
    assert all(r["forward_s"] > 0 and r["train_step_s"] > 0 for r in rows)
    # measured on the CPU, not counted
    assert by["hybrid"]["timing_memory"] < by["dense"]["timing_memory"]
    cost.print_cost_table(rows)
    out = capsys.readouterr().out
    assert "step/flops" in out
    # both tables: one line per mode, "T mode | ...", whose numbers are the rows' and their ratios
    lines = [line.split() for line in out.splitlines() if line.split()[:1] == ["4"]]
    assert [line[1] for line in lines] == ["dense", "edge", "node", "hybrid"] * 2
    dense = by["dense"]
    for line in lines[:4]:  # T sparsity edges | GFLOPs x pred paper | mem x paper | mem x
        row = by[line[1]]
        assert line[2] == f"{row['edges'] / 1e6:.2f}M"
        assert float(line[4]) == pytest.approx(row["gflops"], abs=0.05)
        assert float(line[5]) == pytest.approx(row["gflops"] / dense["gflops"], abs=0.005)
        assert float(line[10]) == pytest.approx(row["memory_plain"] / dense["memory_plain"],
                                                abs=0.005)
    for line in lines[4:]:  # T sparsity | GFLOPs x | memory x | forward x | step x | step/flops
        row = by[line[1]]
        assert float(line[3]) == pytest.approx(row["timing_gflops"], abs=0.005)
        step_ratio = row["train_step_s"] / dense["train_step_s"]
        assert float(line[13]) == pytest.approx(step_ratio, abs=0.005)
        flops_ratio = row["timing_gflops"] / dense["timing_gflops"]
        assert float(line[15]) == pytest.approx(step_ratio / flops_ratio, abs=0.005)
