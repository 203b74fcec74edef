"""`python -m uncurl.sweep`: which runs a sweep's variants make, where they live, on which data,
and the CSV the premise-sweep appendix reads."""

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from uncurl import layout, sweep
from uncurl.config import DataConfig, Profile, get_profile
from uncurl.report import premise

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prepared(monkeypatch, tmp_path, smoke_data) -> Path:
    """A prepared-data root of its own, holding the smoke profile's data under its name."""
    root = tmp_path / "prepared"
    shutil.copytree(smoke_data, root / "smoke")
    monkeypatch.setattr(layout, "PREPARED", root)
    monkeypatch.chdir(ROOT)  # the smoke profile's corpus path is relative to the repository
    return root


@pytest.fixture
def preparations(monkeypatch) -> list[tuple[Path, dict]]:
    """Calls of `data.prepare` from the sweep, each leaving a prepared folder's meta.json."""
    calls = []

    def prepare(out, **fields):
        calls.append((Path(out), fields))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / layout.META).write_text(json.dumps({"params": fields}))
        return Path(out)

    monkeypatch.setattr(sweep.data, "prepare", prepare)
    return calls


VARIANTS = [
    ("smoke profile", 320, {}, {}, (1, 4)),
    ("router std 1.0", 320, {"router_init_std": 1.0}, {}, (4,)),
    ("smoke profile, seed 1", 320, {}, {"seed": 1}, (1,)),
    ("vocab 288", 288, {}, {}, (1,)),
]


def test_jobs_share_the_profiles_own_runs_and_put_variants_under_the_sweep(
    monkeypatch, prepared, preparations, tmp_path
):
    monkeypatch.setattr(sweep, "VARIANTS", VARIANTS)
    profile, runs = get_profile("smoke"), tmp_path / "runs"
    jobs = sweep.jobs_for(profile, runs)
    assert [(j["label"], j["out"]) for j in jobs] == [
        ("smoke profile", runs / "smoke" / "dense"),  # the profile's own pretraining runs
        ("smoke profile", runs / "smoke" / "e4"),
        ("router std 1.0", runs / "sweep" / "router-std-1-0-e4"),
        ("smoke profile, seed 1", runs / "sweep" / "smoke-profile-seed-1-dense"),
        ("vocab 288", runs / "sweep" / "vocab-288-dense"),  # no override but another vocabulary
    ]
    base_model, base_train = profile.model_config(), dataclasses.asdict(profile.train_config())
    want = [  # n_expert, vocabulary, router std (None: the profile's), seed
        (1, 320, None, 0),
        (4, 320, None, 0),
        (4, 320, 1.0, 0),
        (1, 320, None, 1),
        (1, 288, None, 0),
    ]
    for job, (n, vocab, std, seed) in zip(jobs, want, strict=True):
        model, train = job["model"], job["train"]
        assert (model["n_expert"], model["vocab_size"]) == (n, vocab)
        assert model["router_init_std"] == (std or base_model.router_init_std)
        assert model["n_embd"] == base_model.n_embd and model["n_layer"] == base_model.n_layer
        assert train == {**base_train, "seed": seed}
    # the profile's vocabulary reads the profile's data; another is prepared beside it, once
    assert [j["data"] for j in jobs] == [profile.data_dir] * 4 + [prepared / "smoke-v288"]
    assert profile.data_dir == prepared / "smoke"
    assert [out for out, _ in preparations] == [prepared / "smoke-v288"]
    assert sweep.jobs_for(profile, runs) == jobs and len(preparations) == 1


def test_a_vocabulary_variant_changes_only_the_vocabulary_of_the_data(
    monkeypatch, prepared, preparations, tmp_path
):
    monkeypatch.setattr(sweep, "VARIANTS", [("vocab 288", 288, {}, {}, (1,))])
    smoke = get_profile("smoke")
    profile = Profile(**{**vars(smoke), "data": {**smoke.data, "seed": 3, "val_frac": 0.1}})
    stale = prepared / "smoke-v288"  # prepared before with the default split seed
    stale.mkdir()
    (stale / layout.META).write_text(json.dumps({"params": {"seed": 0}}))
    sweep.jobs_for(profile, tmp_path / "runs")
    ((out, fields),) = preparations
    assert out == stale
    # what `data.prepare` makes of its fields: the profile's preparation at another vocabulary
    got = dataclasses.asdict(DataConfig.from_dict(fields))
    assert got == {**dataclasses.asdict(profile.data_config()), "vocab_size": 288}
    sweep.jobs_for(profile, tmp_path / "runs")
    assert len(preparations) == 1  # now it matches: kept


def test_main_trains_every_variant_and_writes_the_appendix_csv(
    monkeypatch, prepared, tmp_path, capsys
):
    variants = [
        ("smoke profile", 320, {}, {}, (1, 2)),
        ("smoke profile, seed 1", 320, {}, {"seed": 1, "max_steps": 4}, (1,)),
        ("vocab 288, 4 steps", 288, {}, {"max_steps": 4}, (2,)),
    ]
    monkeypatch.setattr(sweep, "VARIANTS", variants)
    runs, csv = tmp_path / "runs", tmp_path / "out" / "sweep.csv"
    argv = ["--profile", "smoke", "--runs", str(runs), "--csv", str(csv), "--jobs", "1"]
    sweep.main(argv)
    df = premise.load_sweep(csv)  # the appendix's column check
    assert list(df["variant"]) == ["smoke profile"] * 2 + [v[0] for v in variants[1:]]
    assert list(df["n_expert"]) == [1, 2, 1, 2] and list(df["seed"]) == [0, 0, 1, 0]
    assert list(df["vocab_size"]) == [320, 320, 320, 288]
    assert list(df["steps"]) == [20, 20, 4, 4]
    tokens_per_step = 8 * 32  # the smoke profile's batch x block
    assert list(df["tokens"]) == [s * tokens_per_step for s in df["steps"]]
    assert df["val_loss"].notna().all() and (df["val_loss"] > 0).all()
    for row in df.itertuples():
        summary = json.loads((Path(row.run) / layout.SUMMARY).read_text())
        assert summary["val_loss"] == pytest.approx(row.val_loss)
        assert summary["parameters"]["total"] == row.total_params
        assert summary["model"]["vocab_size"] == row.vocab_size
    assert Path(df["run"][0]) == runs / "smoke" / "dense"
    assert (layout.PREPARED / "smoke-v288" / layout.META).exists()
    gaps = premise.sweep_gaps(df)
    assert list(zip(gaps["variant"], gaps["n_expert"], strict=True)) == [("smoke profile", 2)]
    assert "vocab 288, 4 steps" in capsys.readouterr().out
    # finished runs are kept: a second sweep trains nothing and writes the same numbers
    sweep.main(argv)
    pd.testing.assert_frame_equal(premise.load_sweep(csv), df)
