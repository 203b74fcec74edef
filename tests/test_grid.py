"""The fine-tuning grid: jobs of populations give every member the result of its run alone, on
this machine's cores or on Ray; done jobs are reused; a failed job names its log."""

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import sigkilled

from uncurl import data, evaluate, executor, finetune, layout, protocol
from uncurl.config import get_profile
from uncurl.model.checkpoint import read_info
from uncurl.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grid(smoke_data, tmp_path_factory):
    """The smoke profile on the test's prepared data, its models pretrained once."""
    profile = get_profile("smoke")
    # an absolute data name: the profile reads its corpus from the tests' prepared copy
    profile = dataclasses.replace(profile, data={**profile.data, "name": str(smoke_data)})
    runs = tmp_path_factory.mktemp("runs")
    vocab_size = data.load_meta(smoke_data)["vocab_size"]
    for n in {2, 4}:
        cfg = profile.model_config(n_expert=n, vocab_size=vocab_size)
        train(layout.Runs(runs, "smoke").pretrained(n), cfg, profile.train_config(), smoke_data)
    return profile, runs


def _copy_pretrained(grid, tmp_path):
    profile, runs = grid
    fresh = tmp_path / "runs"
    for n in (2, 4):
        src, dst = (layout.Runs(r, "smoke").pretrained(n) for r in (runs, fresh))
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    return profile, fresh


def _comparable(result: dict) -> dict:
    """What a run computed (not when, where or how long)."""
    keep = ("model", "task", "seed", "metrics", "per_example", "units", "heldout_per_example")
    keep += ("router_warmup", "training")
    return {k: result[k] for k in keep}


def test_a_job_gives_every_member_its_solo_result(grid, tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_MEMBERS", 5)  # populations of 5, 5 and the rest
    profile, runs = _copy_pretrained(grid, tmp_path)
    results = protocol.run_task(profile, "rotten_tomatoes", runs, progress=False)
    cfg = profile.finetune_config("rotten_tomatoes")
    assert len(results) == len(protocol.study_models(profile)) * cfg.seeds
    sizes = Counter(r["population"]["members"] for r in results)
    assert sizes == {5: 10, len(results) % 5: len(results) % 5}  # each member in one population
    folders = layout.Runs(runs, "smoke")
    for r in results:
        model = layout.parse_label(r["model"]["model"])
        start = protocol.starting_point(profile, "rotten_tomatoes", model, r["seed"], folders)
        alone = finetune.run(
            start,
            "rotten_tomatoes",
            r["seed"],
            tmp_path / "alone" / r["model"]["model"] / str(r["seed"]),
            cfg,
            profile.data_dir,
            profile.task_source,
        )
        assert _comparable(alone) == _comparable(r)
        assert alone["params"] == r["params"]  # so a solo run finds the member's result done


def test_a_job_that_fails_keeps_the_populations_it_finished(grid, tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_MEMBERS", 5)
    profile, runs = _copy_pretrained(grid, tmp_path)
    real, calls, fails = protocol._population, [], iter([False, True])  # the second, once

    def second_fails(*args):
        calls.append(len(args[0]))
        if next(fails, False):
            raise RuntimeError("machine gone")
        return real(*args)

    monkeypatch.setattr(protocol, "_population", second_fails)
    with pytest.raises(RuntimeError, match="machine gone"):
        protocol.run_task(profile, "rotten_tomatoes", runs, progress=False)
    kept = sorted((runs / "smoke/finetune/rotten_tomatoes").rglob(layout.RESULT))
    assert len(kept) == calls[0] == 5
    calls.clear()
    results = protocol.run_task(profile, "rotten_tomatoes", runs, progress=False)
    assert sum(calls) == len(results) - 5  # the kept five are read back, not trained again


def test_each_seed_starts_from_the_models_of_its_pretraining_seed(grid, tmp_path):
    """pretrain_seeds = [0, 1]: seed 1 fine-tunes e2-p1 and reduces e4-p1, and the intervals
    resample pretraining seeds first."""
    profile, runs = _copy_pretrained(grid, tmp_path)
    profile = dataclasses.replace(
        profile,
        pretrain_seeds=(0, 1),
        reductions=({"source_n_expert": 4, "target_n_expert": 2, "methods": ["uncurl"]},),
    )
    folders = layout.Runs(runs, "smoke")
    vocab_size = data.load_meta(profile.data_dir)["vocab_size"]
    for n in (2, 4):
        cfg = profile.model_config(n_expert=n, vocab_size=vocab_size)
        train(folders.pretrained(n, 1), cfg, profile.train_config(seed=1), profile.data_dir)
    results = protocol.run_task(profile, "rotten_tomatoes", runs, progress=False)
    assert {(r["model"]["model"], r["seed"], r["pretrain_seed"]) for r in results} == {
        ("e2", 0, 0),
        ("e2", 1, 1),
        ("e4-uncurl-d2", 0, 0),
        ("e4-uncurl-d2", 1, 1),
    }
    by = {(r["model"]["model"], r["seed"]): r for r in results}
    assert by["e2", 1]["params"]["checkpoint"] == str(folders.pretrained(2, 1))
    reduced = Path(by["e4-uncurl-d2", 1]["params"]["checkpoint"])
    assert read_info(reduced)["reduction"]["from"].startswith(str(folders.pretrained(4, 1)))
    assert evaluate.pretrain_groups(results, "e2", "rotten_tomatoes") == [0, 1]
    assert len(evaluate.comparisons(results, n_boot=50)) == 1


def test_the_grid_reuses_done_jobs_and_names_a_failed_one(grid, tmp_path, capsys):
    profile, runs = _copy_pretrained(grid, tmp_path)
    jobs = protocol.grid_jobs(profile, runs)
    assert [j.name for j in jobs] == ["drama d2", "rotten_tomatoes d2"]
    assert not any(j.done for j in jobs)
    protocol.run_grid(profile, runs)
    assert all(j.done for j in protocol.grid_jobs(profile, runs))
    out = capsys.readouterr().out
    assert "2/2 done" in out and "left" in out
    protocol.run_grid(profile, runs)
    assert "2 job(s) done earlier, reused" in capsys.readouterr().out
    broken = executor.Job("broken", _fail, (), tmp_path / "logs" / "broken.log")
    with pytest.raises(executor.JobError, match=r"broken failed: ValueError: no such thing") as e:
        executor.run_jobs([broken], workers=1)
    assert str(broken.log) in str(e.value)
    assert "Traceback" in broken.log.read_text()


def _fail():
    raise ValueError("no such thing")


def test_ray_runs_the_grid_as_the_local_executor_does(grid, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is an optional extra: pip install -e '.[ray]'")
    local = _copy_pretrained(grid, tmp_path / "local")
    on_ray = _copy_pretrained(grid, tmp_path / "ray")
    protocol.run_grid(*local)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        protocol.run_grid(*on_ray, executor="ray")
        print(f"smoke grid on ray: {time.perf_counter() - started:.1f} s")
    finally:
        ray.shutdown()
    for task in local[0].all_tasks:
        a, b = (
            sorted(p.rglob(layout.RESULT))
            for p in (r / "smoke/finetune" / task for _, r in (local, on_ray))
        )
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert _comparable(json.loads(x.read_text())) == _comparable(json.loads(y.read_text()))


def test_the_largest_jobs_are_submitted_first(tmp_path):
    """Longest first: the grid's end is not one big job running while the other cores idle."""
    profile = get_profile("small")
    jobs = protocol.grid_jobs(profile, tmp_path)
    members = Counter(m["target_n_expert"] for m in protocol.study_models(profile))
    sizes = [members[j.args[2]] for j in jobs]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 1
    assert len(jobs) == len(profile.all_tasks) * len(members) and not any(j.done for j in jobs)


KILLED_WHILE_A_JOB_RUNS = """
import os, signal, sys, threading, time
from pathlib import Path
from uncurl.executor import Job, run_jobs
log, listing = map(Path, sys.argv[1:])
def workers():
    return [p for p in filter(str.isdigit, os.listdir("/proc"))
            if open(f"/proc/{p}/stat").read().rpartition(")")[2].split()[1] == str(os.getpid())]
def die_once_the_job_runs():
    while not log.exists():
        time.sleep(0.05)
    listing.write_text(" ".join(workers()))
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=die_once_the_job_runs, daemon=True).start()
run_jobs([Job("sleep", time.sleep, (120,), log)], workers=1)
"""


def test_a_killed_executor_takes_its_running_jobs_with_it(tmp_path):
    """A study killed mid-grid leaves no job running on in the background."""
    listing = tmp_path / "workers"
    sigkilled(["-c", KILLED_WHILE_A_JOB_RUNS, str(tmp_path / "job.log"), str(listing)])
    pids = [int(p) for p in listing.read_text().split()]
    assert pids
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), "a worker outlived its executor"
