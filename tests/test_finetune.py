"""Fine-tuning and evaluation: the scorer, learning a task, results that resume, honest verdicts."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killed, one_line_error
from torch import nn

from uncurl import data, evaluate, finetune, layout, tasks
from uncurl.config import get_profile
from uncurl.model import GPT, Output
from uncurl.model.checkpoint import save_checkpoint
from uncurl.reduce.save import reduce_checkpoint
from uncurl.report import threshold

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = str(ROOT / "tests" / "fixtures" / "tasks")
FAST = dict(
    max_steps=30,
    eval_interval=10,
    batch_tokens=256,
    max_val=40,
    max_heldout=16,
    max_val_windows=8,
    router_warmup_steps=2,
    threads=1,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _output(logits: torch.Tensor, targets) -> Output:
    """What GPT.forward returns: with targets, the logits and nll at the target positions."""
    if targets is None:
        return Output(logits, None, None, None, None)
    at = targets >= 0
    nll = -logits[at].log_softmax(-1).gather(1, targets[at][:, None]).squeeze(1)
    return Output(logits[at], None, None, None, None, nll)


class Unigram(nn.Module):
    """Every position predicts the same known distribution: log p(token) = logp[token]."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp

    def forward(self, idx, targets=None, dropless=False, positions=None, attn_mask=None):
        return _output(self.logp.expand(*idx.shape, -1), targets)


def test_choice_scorer_ranks_answers_by_their_known_likelihood():
    logp = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0]), 0)
    model = Unigram(logp)
    enc = [
        tasks.Encoded(np.array([0, 0]), (np.array([1]), np.array([3]), np.array([2, 2])), 1),
        tasks.Encoded(np.array([4]), (np.array([4, 4]), np.array([1])), 0),
    ]
    scores = evaluate.choice_scores(model, enc)
    expected = [[logp[1], logp[3], 2 * logp[2]], [2 * logp[4], logp[1], -np.inf]]
    np.testing.assert_allclose(scores, np.array(expected, dtype=float), rtol=1e-6)
    # picks: 3 (the likeliest single token) for the first, 1 for the second
    assert evaluate.correct(model, enc).tolist() == [1.0, 0.0]


class Bigram(nn.Module):
    """The next token's distribution depends on the current one: log p(b | a) = logp[a, b]."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp

    def forward(self, idx, targets=None, dropless=False, positions=None, attn_mask=None):
        return _output(self.logp[idx], targets)


def test_scores_use_each_answer_token_after_its_own_context_in_any_batch():
    rng = np.random.default_rng(0)
    logp = torch.log_softmax(torch.tensor(rng.normal(size=(6, 6))), 1)
    enc = [
        tasks.Encoded(rng.integers(0, 6, n), tuple(rng.integers(0, 6, (k, m))), 0)
        for n, k, m in [(3, 2, 2), (1, 3, 1), (5, 2, 3), (2, 2, 1), (4, 3, 2)]
    ]

    def by_hand(prompt, answer):
        seq = np.concatenate([prompt, answer])
        return sum(float(logp[seq[i - 1], seq[i]]) for i in range(len(prompt), len(seq)))

    expected = [[by_hand(e.prompt, c) for c in e.choices] for e in enc]
    for batch_size in (1, 2, 64):  # sorted by length into batches, then put back in order
        got = evaluate.choice_scores(Bigram(logp), enc, batch_size)
        for row, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(row[: len(want)], want, rtol=1e-5)


def test_an_examples_score_does_not_depend_on_its_batch(smoke_data):
    torch.manual_seed(0)  # an MoE whose evaluation capacity (1.0) would drop tokens
    model = GPT(
        get_profile("smoke").model_config(
            vocab_size=320, n_expert=4, eval_capacity_factor=1.0, min_capacity=1
        )
    )
    exs = tasks.examples(tasks.get_task("rotten_tomatoes"), SAMPLES)["val"]
    enc = tasks.encode(data.load_tokenizer(smoke_data), exs, model.cfg.block_size)
    alone = evaluate.choice_scores(model, enc, batch_size=1)
    np.testing.assert_allclose(evaluate.choice_scores(model, enc, batch_size=64), alone, rtol=1e-5)


@pytest.fixture(scope="module")
def smoke_ckpt(smoke_data, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = get_profile("smoke").model_config(vocab_size=320, n_expert=4)
    return save_checkpoint(
        tmp_path_factory.mktemp("ck") / "e4", GPT(cfg), data.load_tokenizer(smoke_data)
    )


def _cfg(**kw):
    return get_profile("smoke").finetune_config(**{**FAST, **kw})


@pytest.mark.parametrize("task", ["rotten_tomatoes", "drama"])
def test_finetuning_lowers_the_task_loss_and_keeps_the_best_weights(smoke_ckpt, smoke_data, task):
    model = finetune.load_model(smoke_ckpt)
    tok = data.load_tokenizer(smoke_data)
    d = tasks.load_task(task, tok, model.cfg.block_size, _cfg(), smoke_data, SAMPLES)
    before = finetune.heldout_loss(model, d)
    out = finetune.finetune(model, d, _cfg(), seed=0)
    assert out["best_heldout_loss"] < before - 0.05
    assert finetune.heldout_loss(model, d) == pytest.approx(out["best_heldout_loss"], abs=1e-5)
    assert out["best_step"] > 0  # the untrained weights are never the answer


def test_a_run_records_per_example_scores_and_is_not_redone(smoke_ckpt, smoke_data, tmp_path):
    args = (smoke_ckpt, "rotten_tomatoes", 0, tmp_path / "run", _cfg(), smoke_data, SAMPLES)
    first = finetune.run(*args)
    assert first["model"] == {
        "model": "e4",
        "source_n_expert": 4,
        "target_n_expert": 4,
        "method": "scratch",
    }
    assert len(first["per_example"]) == first["sizes"]["val"]
    assert first["metrics"]["accuracy"] == pytest.approx(np.mean(first["per_example"]))
    assert first["units"] is None  # each example its own unit
    held = first["heldout_per_example"]
    assert len(held) == first["sizes"]["heldout"] and set(held) <= {0.0, 1.0}
    assert first["metrics"]["heldout_accuracy"] == pytest.approx(np.mean(held))
    assert 0 < first["metrics"]["heldout_majority"] <= 1
    assert finetune.run(*args)["wall_s"] == first["wall_s"]  # read back, not retrained
    again = finetune.run(*args[:4], _cfg(lr=1e-4), *args[5:])  # other parameters: redone
    assert again["params"]["finetune"]["lr"] == 1e-4


def test_same_seed_same_numbers(smoke_ckpt, smoke_data, tmp_path):
    runs = [
        finetune.run(smoke_ckpt, "drama", 1, tmp_path / str(i), _cfg(), smoke_data)
        for i in range(2)
    ]
    assert runs[0]["per_example"] == runs[1]["per_example"]
    units, windows = runs[0]["units"], runs[0]["sizes"]["val"]
    assert len(units) == windows and len(set(units)) == windows // _cfg().val_unit_windows
    assert runs[0]["heldout_per_example"] is None


@pytest.mark.parametrize("method", ["uncurl", "hcsmoe-tied"])  # a new router; a kept, tied one
def test_reduced_model_gets_the_router_warmup_and_its_label(
    smoke_ckpt, smoke_data, tmp_path, method
):
    tok = data.load_tokenizer(smoke_data)
    docs = tasks.answered(
        tasks.encode(tok, tasks.examples(tasks.get_task("rotten_tomatoes"), SAMPLES)["train"])
    )
    red = reduce_checkpoint(smoke_ckpt, tmp_path / "red", method, 2, docs, "rotten_tomatoes")
    result = finetune.run(red, "rotten_tomatoes", 0, tmp_path / "ft", _cfg(), None, SAMPLES)
    assert result["model"] == {
        "model": f"e4-{method}-d2",
        "source_n_expert": 4,
        "target_n_expert": 2,
        "method": method,
    }
    assert len(result["router_warmup"]) == FAST["router_warmup_steps"]


def _result(model, source, target, method, seed, per):
    return {
        "model": {
            "model": model,
            "source_n_expert": source,
            "target_n_expert": target,
            "method": method,
        },
        "task": "t",
        "seed": seed,
        "metric": "accuracy",
        "metrics": {"accuracy": float(np.mean(per))},
        "per_example": list(per),
    }


def test_tables_pair_each_reduced_model_with_its_from_scratch_size():
    rng = np.random.default_rng(2)
    results = [
        r
        for s in range(3)
        for r in (
            _result("e2", 2, 2, "scratch", s, rng.integers(0, 2, 300)),
            _result("e4-uncurl-d2", 4, 2, "uncurl", s, np.ones(300)),
        )
    ]
    results.append(_result("e2", 2, 2, "scratch", 7, np.zeros(300)))  # a seed only one has
    tidy = evaluate.tidy(results)
    assert list(tidy.columns) == evaluate.COLUMNS and len(tidy) == 7
    summary = evaluate.summary(results, n_boot=200)
    assert dict(zip(summary["model"], summary["seeds"], strict=True)) == {
        "e2": 4,
        "e4-uncurl-d2": 3,
    }
    (row,) = evaluate.comparisons(results, n_boot=200).to_dict("records")
    assert row["reference"] == "e2" and row["verdict"] == "+" and row["seeds"] == 3
    ones = evaluate.score_matrix(results, "e2", "t", seeds=[7, 0])
    assert ones[0].sum() == 0 and ones[1].tolist() == results[0]["per_example"]


def test_lm_intervals_and_comparisons_resample_the_units():
    """Windows of one unit share its offset: the intervals over units are the wider ones, and
    a difference that is real in every unit stays a win."""
    rng = np.random.default_rng(4)
    units = [f"0:doc:{u}" for u in np.repeat(np.arange(20), 10)]  # 20 units of 10 windows
    offsets = rng.normal(size=20).repeat(10)
    results = [
        {
            **_result(m, s, 2, method, seed, offsets + 0.1 * rng.normal(size=200) - gain),
            "kind": "lm",
        }
        | {"metric": "loss", "units": units}
        for seed in range(3)
        for m, s, method, gain in (("e2", 2, "scratch", 0.0), ("e4-uncurl-d2", 4, "uncurl", 0.2))
    ]
    alone = [r | {"units": [str(i) for i in range(200)]} for r in results]  # windows as units
    by_unit, by_window = (evaluate.summary(r, n_boot=400) for r in (results, alone))
    assert (
        (by_unit["ci_high"] - by_unit["ci_low"]) > 2 * (by_window["ci_high"] - by_window["ci_low"])
    ).all()
    (row,) = evaluate.comparisons(results, n_boot=400).to_dict("records")
    assert row["verdict"] == "+" and row["ci_high"] < 0  # the loss fell by 0.2 everywhere
    (adv,) = threshold.advantages(results, n_boot=400).to_dict("records")
    assert adv["ci_low"] > 0
    with pytest.raises(ValueError, match="no validation units"):
        evaluate.summary([r | {"units": None} for r in results], n_boot=10)


def finetune_command(checkpoint, out, smoke_data, task="drama", *extra) -> list[str]:
    return [
        *["--checkpoint", str(checkpoint), "--task", task, "--out", str(out)],
        *["--profile", "smoke", "--data-dir", str(smoke_data), *extra],
    ]


CASES = ("task", "no-checkpoint", "foreign", "no-tokenizer", "set", "busy")


@pytest.fixture(scope="module")
def wrong_checkpoints(smoke_data, tmp_path_factory) -> dict[str, Path]:
    """A model of another library (its config.json has no uncurl settings) and one of ours
    saved without its tokenizer."""
    root = tmp_path_factory.mktemp("wrong")
    torch.manual_seed(0)
    bare = save_checkpoint(root / "bare", GPT(get_profile("smoke").model_config(vocab_size=320)))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes((bare / "model.safetensors").read_bytes())
    (foreign / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    return {"bare": bare, "foreign": foreign}


@pytest.mark.parametrize(
    "case, problem, fix",
    [
        ("task", "unknown task 'sst2'", "registered tasks: "),
        ("no-checkpoint", "no checkpoint at ", "train one with `python -m uncurl.train`"),
        ("foreign", "is not an uncurl checkpoint", "give a folder written by uncurl.train"),
        ("no-tokenizer", "needs the model's tokenizer", "save the checkpoint with its tokenizer"),
        ("set", "unknown finetune key 'lrr' (did you mean 'lr'?)", "known: "),
        ("busy", "is in use by pid ", "wait for it to finish, or stop it"),
    ],
    ids=CASES,
)
def test_finetune_bad_input_gets_one_line_and_writes_nothing(
    smoke_ckpt, smoke_data, wrong_checkpoints, tmp_path, capsys, case, problem, fix
):
    out = tmp_path / "out"
    argv = {
        "task": finetune_command(smoke_ckpt, out, smoke_data, "sst2"),
        "no-checkpoint": finetune_command(smoke_data, out, smoke_data),
        "foreign": finetune_command(wrong_checkpoints["foreign"], out, smoke_data),
        "no-tokenizer": finetune_command(
            wrong_checkpoints["bare"], out, smoke_data, "rotten_tomatoes"
        ),
        "set": finetune_command(smoke_ckpt, out, smoke_data, "drama", "--set", "lrr=1"),
        "busy": finetune_command(smoke_ckpt, out, smoke_data),
    }[case]
    with layout.locked(out) if case == "busy" else contextlib.nullcontext():
        err = one_line_error(capsys, finetune.main, argv, "python -m uncurl.finetune")
    assert problem in err and fix in err
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == (["out", "out/.lock"] if case == "busy" else [])  # the holder's lock only


@pytest.mark.parametrize(
    "argv, problem, fix",
    [
        (["--runs", "nowhere"], "nowhere is not a folder of fine-tuning results", "--out wrote"),
        (["--runs", "{empty}"], "no result.json under", "run python -m uncurl.finetune first"),
        (["--checkpoint", "{empty}"], "--checkpoint needs --task", "a registered task"),
        (["--checkpoint", "{empty}", "--task", "drama"], "no checkpoint at", "uncurl.train"),
        (["--checkpoint", "{ckpt}", "--task", "sst2"], "unknown task 'sst2'", "registered tasks"),
    ],
    ids=["missing", "empty", "no-task", "no-checkpoint", "task"],
)
def test_evaluate_bad_input_gets_one_line(smoke_ckpt, tmp_path, capsys, argv, problem, fix):
    argv = [a.format(empty=tmp_path, ckpt=smoke_ckpt) for a in argv]
    err = one_line_error(
        capsys, evaluate.main, [*argv, "--profile", "smoke"], "python -m uncurl.evaluate"
    )
    assert problem in err and fix in err
    assert list(tmp_path.iterdir()) == []


def _without_clocks(result: dict) -> dict:
    return {**result, "wall_s": None, "environment": None}


def test_killed_while_writing_its_result_and_rerun_it_ends_as_an_uninterrupted_run(
    smoke_ckpt, smoke_data, tmp_path
):
    fast = ["--set", "max_steps=10", "eval_interval=5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    finetune.main(finetune_command(smoke_ckpt, full, smoke_data, "drama", *fast))
    command = [
        "-m",
        "uncurl.finetune",
        *finetune_command(smoke_ckpt, cut, smoke_data, "drama", *fast),
    ]
    killed("os.replace", 1, command, match="result.json")  # written, not yet renamed
    assert not (cut / "result.json").exists()
    finetune.main(finetune_command(smoke_ckpt, cut, smoke_data, "drama", *fast))
    results = [_without_clocks(layout.read_json(run / "result.json")) for run in (full, cut)]
    assert results[0] == results[1]
    assert sorted(p.name for p in cut.iterdir()) == [".lock", "result.json"]


def test_a_task_can_adjust_the_recipe_for_every_model_on_it():
    from uncurl.config import Profile

    p = Profile("p", finetune={"lr": 1e-3, "max_steps": 50}, task_finetune={"t": {"lr": 5e-4}})
    assert p.finetune_config("t").lr == 5e-4 and p.finetune_config("t").max_steps == 50
    assert p.finetune_config("other").lr == 1e-3 and p.finetune_config().lr == 1e-3


def test_methods_reducing_one_source_on_one_sample_read_its_statistics_once(
    smoke_ckpt, smoke_data, tmp_path, monkeypatch
):
    """The second method reuses the first's statistics, and reduces as it does alone."""
    from uncurl.reduce import save

    tok = data.load_tokenizer(smoke_data)
    docs = tasks.answered(
        tasks.encode(tok, tasks.examples(tasks.get_task("rotten_tomatoes"), SAMPLES)["train"])
    )
    monkeypatch.setattr(save, "_STATS", {})
    reads = []
    monkeypatch.setattr(save, "collect_stats", lambda *a: reads.append(a) or collect(*a))
    collect = save.reduce_model.__globals__["collect_stats"]
    for method, out in [("uncurl", "a"), ("greedy", "b"), ("hcsmoe", "c")]:
        reduce_checkpoint(smoke_ckpt, tmp_path / out, method, 2, docs, "rotten_tomatoes")
    assert len(reads) == 2  # uncurl and greedy share theirs; hcsmoe needs the experts' outputs
    save._STATS.clear()
    reduce_checkpoint(smoke_ckpt, tmp_path / "alone", "greedy", 2, docs, "rotten_tomatoes")
    weights = [tmp_path / f / "model.safetensors" for f in ("b", "alone")]
    assert weights[0].read_bytes() == weights[1].read_bytes()
