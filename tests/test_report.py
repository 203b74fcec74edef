"""What the report notebooks call: loading runs, figures, tables, headline numbers, records."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import standin_sweep
from matplotlib.figure import Figure

from uncurl import evaluate
from uncurl.config import Profile, get_profile
from uncurl.report import dense_equivalent, paper, premise, pretraining, records, style, threshold
from uncurl.report import tasks as tasks_report
from uncurl.report.scaling import CLARK_S_BASE, dense_equivalent_from_fit, fit_fixed_size

ROOT = Path(__file__).resolve().parent.parent
PROFILE = Profile(
    name="tiny",
    data={"name": "tiny-data"},
    model={"n_embd": 32},
    train={"max_steps": 20},
    expert_counts=(1, 4, 8),
)
LOSS = {1: 5.0, 4: 5.1, 8: 5.05}


def fake_runs(root: Path, counts=(1, 4, 8), **model_over) -> Path:
    """Run folders as `uncurl.train.train` leaves them (summary.json, metrics.jsonl)."""
    for n in counts:
        folder = root / PROFILE.name / ("dense" if n == 1 else f"e{n}")
        folder.mkdir(parents=True)
        summary = {
            "name": folder.name,
            "step": 20,
            "tokens": 20 * 256,
            "val_loss": LOSS[n],
            "wall_time_s": 10.0 * n,
            "finished": True,
            "parameters": {"total": 1000 * (1 + n), "active": 2000},
            "model": {"n_embd": 32, "n_expert": n, **model_over},
            "train": {"max_steps": 20},
            "data_hash": None,
            "environment": {
                "git": "abc",
                "cpus": 2,
                "torch_threads": 1,
                "platform": "Linux-6.1-x86_64",
            },
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        lines = [{"step": s, "tokens": s * 256, "loss": 6.0} for s in range(1, 21)]
        for rec in lines[9::10]:
            rec["val_loss"] = LOSS[n] + (0.5 if rec["step"] == 10 else 0)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_load_pretraining_reads_every_expert_count(tmp_path):
    models, curves = pretraining.load_pretraining(fake_runs(tmp_path), PROFILE)
    assert list(models["n_expert"]) == [1, 4, 8]
    assert list(models["run"]) == ["dense", "e4", "e8"]
    assert models.loc[1, "val_loss"] == LOSS[4]
    assert list(curves.columns) == ["n_expert", "step", "tokens", "val_loss"]
    assert len(curves) == 6 and set(curves["step"]) == {10, 20}


def test_load_pretraining_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run with 8 expert"):
        pretraining.load_pretraining(fake_runs(tmp_path, counts=(1, 4)), PROFILE)


def test_load_pretraining_refuses_runs_with_other_settings(tmp_path):
    runs = fake_runs(tmp_path, n_embd=64)
    with pytest.raises(ValueError, match="n_embd: run 64, profile 32"):
        pretraining.load_pretraining(runs, PROFILE)


def test_figures_have_labelled_axes(tmp_path):
    style.use_style()
    models, curves = pretraining.load_pretraining(fake_runs(tmp_path), PROFILE)
    figs = [
        pretraining.plot_loss_curves(curves, paper.pretraining_curves(), "tiny"),
        pretraining.plot_loss_vs_params(models),
        premise.plot_sweep(standin_sweep()),
    ]
    fit = fit_fixed_size(models["n_expert"], models["val_loss"])
    ratios = dense_equivalent_from_fit(fit, models["n_expert"], CLARK_S_BASE.dense_exponent)
    figs.append(
        dense_equivalent.plot_fixed_size_fit(models, fit, ratios, {1: 1.0, 8: 2.0}, CLARK_S_BASE)
    )
    for fig in figs:
        assert isinstance(fig, Figure)
        for ax in fig.axes:
            assert ax.get_xlabel(), ax.get_title()
        assert fig.axes[0].get_ylabel()
    image = style.save_figure(figs[0], tmp_path / "fig" / "curves.png")
    assert (tmp_path / "fig" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert image.data[:4] == b"\x89PNG"


def test_pretraining_headline(tmp_path):
    models, _ = pretraining.load_pretraining(fake_runs(tmp_path), PROFILE)
    values = pretraining.pretraining_headline(models, PROFILE)
    assert values["expert_counts"] == "dense, 4 and 8"
    assert values["best_moe"] == "8 experts"
    assert values["best_moe_vs_dense"] == "0.050 nats per token above"
    assert values["moe_vs_dense"].startswith("every one of the 2 MoE models ends with a higher")
    assert values["total_train_time"] == "2.2 minutes"
    assert values["hardware"].startswith("2 CPU cores, 1 thread(s) per run (Linux")
    assert values["reductions"] == "none" and values["paper_backbone"] == "354M"
    assert all(not isinstance(v, np.generic) for v in values.values())


def test_helpers():
    assert style.human(2_460_000) == "2.46M" and style.human(512) == "512"
    assert style.expert_range((1, 8, 32, 128)) == "8 to 128"
    assert style.listing(["a"]) == "a" and style.listing(["a", "b", "c"]) == "a, b and c"
    assert style.duration(42) == "42 s" and style.duration(750) == "12.5 minutes"
    assert style.expert_color(1) != style.expert_color(8)


def test_sweep_gaps_and_headline():
    df = standin_sweep()
    gaps = premise.sweep_gaps(df)
    assert list(gaps["gap"].round(3)) == [0.1, 0.12, 0.14]
    assert list(gaps["dense_variant"]) == list(gaps["variant"])
    values = premise.sweep_headline(df)
    assert (values["n_moe_worse"], values["n_pairs"], values["n_variants"]) == (3, 3, 3)
    # "B: small" and "B, seed 1" differ only by seed: their spread is the seed noise
    assert premise.sweep_base("B, seed 1") == premise.sweep_base("B: small") == "B"
    assert values["seed_spread"] == "0.120"
    assert values["sweep_time"] == "10.0 minutes"


def test_a_variant_without_dense_run_is_compared_with_the_dense_run_of_its_shape():
    df = standin_sweep()
    router = df[(df["variant"] == "B: small") & (df["n_expert"] == 16)].assign(
        variant="router init std 0.3", val_loss=4.55
    )
    gaps = premise.sweep_gaps(pd.concat([df, router]))
    row = gaps[gaps["variant"] == "router init std 0.3"].iloc[0]
    assert row["dense_variant"] == "B: small" and row["gap"] == pytest.approx(4.55 - 4.6)
    # a router variant is not a seed replica of the profile it modifies
    assert premise.sweep_headline(pd.concat([df, router]))["seed_spread"] == "0.120"


def test_load_sweep_checks_columns(tmp_path):
    standin_sweep().drop(columns=["git"]).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['git'\]"):
        premise.load_sweep(tmp_path / "s.csv")


def crafted_sweep() -> pd.DataFrame:
    """A sweep whose pairs are known: MoE better and worse than dense, a second seed, a router
    variant without a dense run of its own, another token budget, and a width with no dense run."""
    runs = [  # variant, n_expert, seed, n_embd, tokens, val_loss
        ("base: d 64", 1, 0, 64, 1000, 5.00),
        ("base: d 64", 4, 0, 64, 1000, 5.10),  # +0.10
        ("base: d 64", 16, 0, 64, 1000, 4.90),  # -0.10
        ("base, seed 1", 1, 1, 64, 1000, 5.04),
        ("base, seed 1", 16, 1, 64, 1000, 4.98),  # -0.06 against the seed-1 dense run
        ("router std 1.0", 16, 0, 64, 1000, 5.20),  # +0.20 against base's dense run (same shape)
        ("long: 2000 tokens", 1, 0, 64, 2000, 4.80),
        ("long: 2000 tokens", 16, 0, 64, 2000, 4.85),  # +0.05
        ("wide: d 128", 16, 0, 128, 1000, 5.30),  # no dense run of width 128: no pair
    ]
    return pd.DataFrame(
        [
            {
                "variant": v,
                "n_expert": n,
                "seed": seed,
                "n_embd": width,
                "vocab_size": 2048,
                "router_init_std": 1.0 if v.startswith("router") else 0.3,
                "steps": tokens // 100,
                "tokens": tokens,
                "val_loss": loss,
                "wall_time_s": 60.0,
                "total_params": 10 * n,
                "active_params": 10,
                "git": "x",
                "run": f"runs/{i}",
            }
            for i, (v, n, seed, width, tokens, loss) in enumerate(runs)
        ]
    )


def test_sweep_pairs_each_moe_run_with_its_dense_reference():
    gaps = premise.sweep_gaps(crafted_sweep())
    got = {
        (r.variant, r.seed, r.n_expert): (r.dense_variant, round(r.gap, 6))
        for r in gaps.itertuples()
    }
    assert got == {
        ("base: d 64", 0, 4): ("base: d 64", 0.1),
        ("base: d 64", 0, 16): ("base: d 64", -0.1),
        ("base, seed 1", 1, 16): ("base, seed 1", -0.06),
        ("router std 1.0", 0, 16): ("base: d 64", 0.2),
        ("long: 2000 tokens", 0, 16): ("long: 2000 tokens", 0.05),
    }
    assert (gaps["gap"] == gaps["moe_loss"] - gaps["dense_loss"]).all()


def test_sweep_headline_counts_worse_pairs_and_the_seed_spread():
    df = crafted_sweep()
    values = premise.sweep_headline(df)
    assert values["n_variants"] == 5 and values["n_runs"] == 9
    # five pairs (the width-128 run has no dense reference), three with the MoE model worse
    assert (values["n_pairs"], values["n_moe_worse"]) == (5, 3)
    assert values["min_gap"] == pytest.approx(-0.1) and values["max_gap"] == pytest.approx(0.2)
    # seeds 0 and 1 of "base": 0.04 apart dense, 0.08 apart with 16 experts; 4 experts ran once
    assert values["seed_spread"] == "0.080"
    assert "up to 0.080 nats" in values["seed_sentence"]
    assert values["sweep_time"] == "9.0 minutes"
    one_seed = premise.sweep_headline(df[df["seed"] == 0])
    assert one_seed["seed_spread"] == "not measured"
    assert one_seed["seed_sentence"].startswith("No setting ran with more than one seed")


@pytest.mark.skipif(
    not (ROOT / "data/results/premise_sweep.csv").exists(),
    reason="the premise sweep's results are not committed yet",
)
def test_every_moe_run_of_the_committed_sweep_has_a_dense_reference():
    df = premise.load_sweep(ROOT / "data/results/premise_sweep.csv")
    gaps = premise.sweep_gaps(df)
    moe = df[df["n_expert"] > 1]
    assert sorted(zip(gaps["variant"], gaps["seed"], gaps["n_expert"], strict=True)) == sorted(
        zip(moe["variant"], moe["seed"], moe["n_expert"], strict=True)
    )
    shape = ["n_embd", "vocab_size", "tokens", "seed"]
    dense = df[df["n_expert"] == 1].set_index("variant")
    for r in gaps.itertuples():
        ref = dense.loc[r.dense_variant]
        run = moe[(moe["variant"] == r.variant) & (moe["n_expert"] == r.n_expert)].iloc[0]
        assert list(ref[shape]) == list(run[shape]), r.variant
        assert r.dense_loss == ref["val_loss"]
    values = premise.sweep_headline(df)
    # what the appendix's prose says of the sweep's last setting
    assert values["below"] == "16, 32 and 64 experts" and values["above"] == "4 and 8 experts"
    assert values["flips"] == "16 experts" and values["beyond_spread"] == "64 experts (1 seed)"


def test_the_last_setting_without_an_advantage():
    values = premise.last_setting(standin_sweep())
    assert (values["below"], values["above"]) == ("no expert count", "16 experts")
    assert values["flips"] == values["beyond_spread"] == "no expert count"
    assert values["last_spread"] == "0.120 nats per token"


def test_the_paper_setup_the_prose_states():
    assert paper.headline() == {
        "paper_backbone": "354M",
        "paper_experts": "8 to 128",
        "paper_tokens": "50B",
    }
    assert pretraining.reductions(get_profile("smoke")) == (
        "uncurl, greedy, greedy-first, freq-merge and random on 4 to 2 experts"
    )
    assert pretraining.reductions(get_profile("small")).startswith(
        "uncurl and greedy on 64 to 32 experts; uncurl on 64 to 16, 64 to 8, 32 to 16, 32 to 4,"
    )


def test_profiles_table_lists_every_profile():
    table = pretraining.profiles_table()
    assert {"smoke", "small", "paper"} <= set(table["profile"])
    smoke = table.set_index("profile").loc["smoke"]
    assert smoke["experts"] == "1, 2, 4"


def test_paper_model_sizes_match_the_paper():
    sizes = dense_equivalent.paper_model_sizes([1, 8, 64])
    for n in (1, 8, 64):
        assert sizes[n] == pytest.approx(paper.TOTAL_PARAMS[n], rel=0.03)


def test_write_results_records_provenance(tmp_path):
    path = records.write_results(
        tmp_path / "out",
        {"profile": "tiny"},
        started=0.0,
        tables={"t": pd.DataFrame({"a": [1]})},
        values={"x": np.float64(1.5)},
        outputs=[tmp_path / "o.txt"],
    )
    record = json.loads(path.read_text())
    assert record["parameters"] == {"profile": "tiny"} and record["values"] == {"x": 1.5}
    assert record["tables"] == {"t": "t.csv"} and (tmp_path / "out" / "t.csv").exists()
    assert record["outputs"] == [str(tmp_path / "o.txt")]
    assert {"git", "packages", "python", "wall_time_s", "finished"} <= set(record)
    assert "uncurl/report/records.py" in record["library"]


def test_a_figure_wider_than_the_column_has_its_text_enlarged_to_read_at_column_width(tmp_path):
    """Shrunk to the text column by the page, every label still shows at its theme size."""
    style.use_style()
    sizes = {}
    for width in (style.COLUMN_IN / 2, 2 * style.COLUMN_IN):
        fig = Figure(figsize=(width, 3))
        ax = fig.subplots()
        ax.set_xlabel("x")
        before = ax.xaxis.label.get_fontsize()
        style.save_figure(fig, tmp_path / f"{width}.png")
        sizes[width] = ax.xaxis.label.get_fontsize() / before
    assert sizes == {style.COLUMN_IN / 2: 1.0, 2 * style.COLUMN_IN: 2.0}


def _labelled_result(task: str, seed: int, val: np.ndarray, heldout: np.ndarray) -> dict:
    """A from-scratch e2 run of a labelled task as result.json holds it."""
    model = {"model": "e2", "source_n_expert": 2, "target_n_expert": 2, "method": "scratch"}
    metrics = {"accuracy": val.mean(), "heldout_accuracy": heldout.mean()}
    return {"model": model, "task": task, "seed": seed, "kind": "choice", "metric": "accuracy"} | {
        "metrics": metrics,
        "per_example": val.tolist(),
        "heldout_per_example": heldout.tolist(),
        "units": None,
    }


def _right(rng, share: float) -> np.ndarray:
    return (rng.random(400) < share).astype(float)


def test_a_task_is_learned_by_its_heldout_accuracy_not_its_validation_accuracy():
    rng = np.random.default_rng(5)
    results = [
        r
        for seed in range(3)
        for r in (
            _labelled_result("val_only", seed, _right(rng, 0.9), _right(rng, 0.5)),
            _labelled_result("heldout_too", seed, _right(rng, 0.5), _right(rng, 0.9)),
        )
    ]
    table = pd.DataFrame(
        {
            "task": ["val_only", "heldout_too", "doc"],
            "kind": ["choice", "choice", "lm"],
            "chance": [0.5, 0.5, np.nan],
            "majority": [0.5, 0.5, np.nan],
            "heldout_majority": [0.5, 0.5, np.nan],
            "appendix": [False, False, False],
        }
    )
    summary = evaluate.summary(results, n_boot=200)
    heldout = evaluate.summary(results, n_boot=200, split="heldout")
    scratch = tasks_report.from_scratch(summary, heldout, table)
    assert dict(zip(scratch["task"], scratch["learned"], strict=True)) == {
        "val_only": False,
        "heldout_too": True,
    }
    assert tasks_report.readable_tasks(table, scratch) == ["heldout_too", "doc"]
    val_only = scratch.set_index("task").loc["val_only"]
    assert val_only["ci_low"] > 0.8 and val_only["heldout_mean"] < 0.6  # both kept for the table


def test_every_method_has_a_colour_of_its_own():
    from uncurl.reduce import METHODS

    colours = {m: style.method_color(m) for m in ("scratch", *METHODS)}
    assert len(set(colours.values())) == len(colours)
    assert (0.5, 0.5, 0.5) not in colours.values()  # the colour of a method nobody listed


def _advantage(z, factor, task, sign, n=200):
    draws = sign * np.linspace(0.5, 1.5, n)
    return {"source_n_expert": z, "factor": factor, "task": task, "advantage": sign, "draws": draws}


def test_the_threshold_is_the_largest_factor_won_with_every_smaller_one():
    wins = {  # (Z, factor): sign of the advantage on tasks a and b
        (32, 2): (1, 1),
        (32, 4): (1, -1),  # half the tasks: not won
        (32, 8): (-1, -1),
        (16, 2): (-1, -1),  # lost first: the threshold is 1 whatever comes after
        (16, 4): (1, 1),
    }
    rows = [
        _advantage(z, f, t, s)
        for (z, f), signs in wins.items()
        for t, s in zip("ab", signs, strict=True)
    ]
    adv = pd.DataFrame(rows)
    thr = threshold.thresholds(adv).set_index("source_n_expert")
    assert thr.loc[32, "threshold"] == 2 and thr.loc[16, "threshold"] == 1
    assert (thr["ci_low"] == thr["threshold"]).all() and (thr["ci_high"] == thr["threshold"]).all()
    per = threshold.per_task(adv).set_index(["task", "source_n_expert"])["threshold"]
    assert per.to_dict() == {("a", 16): 1, ("a", 32): 4, ("b", 16): 1, ("b", 32): 2}
    assert threshold.per_task(adv.iloc[:0]).empty
    unsure = pd.DataFrame(  # each task's draws on both sides of zero: won in half the draws
        [_advantage(64, 2, t, 1) | {"draws": np.linspace(-1, 1, 200)} for t in "ab"]
    )
    row = threshold.thresholds(unsure).iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (1, 2) and row["p_at_least_2"] == 0.5


def test_the_answer_follows_the_thresholds():
    thr = pd.DataFrame(
        {"source_n_expert": [16, 32], "threshold": [1, 4], "ci_low": [1, 2], "ci_high": [1, 4]}
    )
    assert "by 4 from 32 experts" in threshold.answer(thr)
    assert "16 experts" not in threshold.answer(thr)
    assert "no reduction" in threshold.answer(thr.assign(threshold=1))
    assert "cannot say" in threshold.answer(thr.iloc[:0])
    shown = threshold.readable(thr.assign(factors="2, 4", p_at_least_2=0.5))
    assert list(shown.columns) == [
        "pretrained experts Z",
        "threshold",
        "95% interval",
        "factors measured",
        "draws with threshold ≥ 2",
    ]
    assert shown["95% interval"].tolist() == ["1 to 1", "2 to 4"]


def test_book_tables_spell_out_record_column_names():
    df = pd.DataFrame(
        {"model": ["e8"], "heldout_ci_low": [0.123456], "p_holm": [0.5], "bbc_news": [1.0]}
    )
    shown = style.display_table(df, {"p_holm": "{:.1f}"})
    assert list(shown.data.columns) == ["model", "held-out interval low", "p (Holm)", "bbc_news"]
    html = shown.to_html()
    assert "0.1235" in html and "0.5" in html and "0.50" not in html
