"""`python -m uncurl.bench reduce`: the steps' times per method, weight matching's cost and
greedy's objective gap per width, and the power law that extrapolates them."""

import contextlib
import io
import json
import math
import re

import pytest
import torch

from uncurl.bench import reduce as bench_reduce
from uncurl.bench.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS, TARGET = (64, 128), 512
STEPS = ("stats", "plan", "align", "apply")


@pytest.fixture(scope="module")
def bench(smoke_data, tmp_path_factory):
    """The command on the smoke profile's shapes and data: a random 4-expert model to 2."""
    out = tmp_path_factory.mktemp("bench") / "reduce.json"
    argv = ["reduce", "--profile", "smoke", "--task-data", f"{smoke_data}:drama"]
    argv += ["--source-n-expert", "4", "--target-n-expert", "2", "--max-tokens", "1024"]
    argv += ["--methods", "uncurl", "greedy", "--widths", *map(str, WIDTHS)]
    argv += ["--extrapolate-to", str(TARGET), "--repeats", "1", "--json", str(out)]
    printed, threads = io.StringIO(), torch.get_num_threads()  # capsys is per test
    try:
        with contextlib.redirect_stdout(printed):
            main(argv)
    finally:
        torch.set_num_threads(threads)  # the command sets its --threads
    return json.loads(out.read_text()), printed.getvalue()


def test_one_row_per_method_with_each_steps_time(bench):
    result, printed = bench
    steps = result["steps"]
    assert (steps["source_n_expert"], steps["target_n_expert"]) == (4, 2)
    assert 0 < steps["tokens"] <= 1024 and steps["checkpoint"] == "random init"
    assert [r["method"] for r in steps["rows"]] == ["uncurl", "greedy"]
    for r in steps["rows"]:
        assert set(r) == {"method", *STEPS, "alignments"}
        assert all(isinstance(r[s], float) and r[s] >= 0 for s in STEPS)
    # uncurl merges 4 experts into 2 groups in the one MoE layer: 2 members aligned to a lead;
    # greedy pruning keeps experts as they are and aligns none
    assert [r["alignments"] for r in steps["rows"]] == [2, 0]
    assert steps["warmup_step_ms"] > 0
    for r in steps["rows"]:  # the printed table holds the recorded numbers
        cells = [f"{r[s]:.2f}" for s in STEPS] + [f"{sum(r[s] for s in STEPS):.2f}"]
        assert re.search(rf"^  {r['method']}\s+" + r"\s+".join(cells), printed, re.M)
    assert "router warm-up" in printed


def test_alignment_rows_and_the_greedy_gap(bench):
    result, printed = bench
    rows = result["alignment"]["rows"]
    assert [r["d_ff"] for r in rows] == list(WIDTHS)
    for r in rows:
        assert r["d_model"] == round(r["d_ff"] * 4096 / 14336)  # Mixtral's ratio
        best, got, identity = (r[f"objective_{k}"] for k in ("hungarian", "greedy", "identity"))
        assert best >= got > identity  # exact >= greedy, and both beat leaving neurons in place
        assert 0 <= r["gap_of_gain"] <= 1 and 0 <= r["gap_of_objective"] <= 1
        assert r["gap_of_gain"] == pytest.approx((best - got) / (best - identity))
        assert re.search(rf"^\s+{r['d_ff']}\s.*{r['gap_of_gain']:.3%}", printed, re.M)


def test_the_unmeasured_width_is_a_power_law_through_the_two_measured_ones(bench):
    result, printed = bench
    (small, large), ext = result["alignment"]["rows"], result["alignment"]["extrapolated"]
    assert ext["d_ff"] == TARGET and ext["fitted_on"] == list(WIDTHS)
    for step in ("scores", "hungarian", "greedy"):
        p = math.log(large[f"{step}_s"] / small[f"{step}_s"]) / math.log(WIDTHS[1] / WIDTHS[0])
        assert ext[f"{step}_exponent"] == pytest.approx(p)
        assert ext[f"{step}_s"] == pytest.approx(large[f"{step}_s"] * (TARGET / WIDTHS[1]) ** p)
    line = rf"^\s+{TARGET}\s.*extrapolated: power law fitted to \[64, 128\]"
    assert re.search(line, printed, re.M)


def test_with_more_widths_the_power_law_fits_those_from_1024():
    rows = [  # t = 2 H^1.5 from 1024 on; the 512 row is off the law (fixed costs)
        {"d_ff": h, **{f"{s}_s": 2 * h**1.5 for s in ("scores", "hungarian", "greedy")}}
        for h in (512, 1024, 2048, 4096)
    ]
    rows[0] = {**rows[0], "hungarian_s": 1e6}
    ext = bench_reduce._extrapolate(rows, 14336)
    assert ext["fitted_on"] == [1024, 2048, 4096]
    for step in ("scores", "hungarian", "greedy"):
        assert ext[f"{step}_exponent"] == pytest.approx(1.5)
        assert ext[f"{step}_s"] == pytest.approx(2 * 14336**1.5)
