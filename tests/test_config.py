"""The manifest's checks (`uncurl.config`): an unknown key anywhere in a profile or a value of the
wrong type fails when profiles.toml is loaded, naming the key, the closest known one or the
type; the command line refuses bad settings in one line and writes nothing."""

import re

import pytest

from uncurl import config
from uncurl.train import main as train_main


def load(tmp_path, *lines: str) -> dict:
    """`load_profiles` of a manifest holding one profile `p` with these lines."""
    path = tmp_path / "profiles.toml"
    counts = (
        []
        if any(line.startswith("expert_counts ") for line in lines)
        else ["expert_counts = [1, 2]"]
    )
    path.write_text("\n".join(["[p]", *counts, *lines]) + "\n")
    return config.load_profiles(path)


def test_a_profile_of_known_keys_loads(tmp_path):
    (profile,) = load(
        tmp_path,
        'data = { name = "d", vocab_size = 320 }',
        "model = { n_embd = 32, n_head = 2, n_expert = [4, 2], n_layer = 4 }",
        "train = { lr = 1e-3, max_steps = 7 }",
        "finetune = { patience = 2 }",
        "task_finetune = { drama = { batch_tokens = 512 } }",
        'reductions = [{ source_n_expert = 4, target_n_expert = 2, methods = ["uncurl"] }]',
        "inference_bench = { repeats = 3, procs = [1, 2] }",
    ).values()
    assert profile.expert_counts == (1, 2)  # lists become the tuples the fields are
    assert profile.model_config().n_expert == (4, 2)
    assert profile.train_config().max_steps == 7 and profile.train_config().lr == 1e-3
    assert profile.finetune_config("drama").batch_tokens == 512
    assert profile.finetune_config("drama").patience == 2
    assert profile.finetune_config().batch_tokens == config.FinetuneConfig.batch_tokens
    assert profile.bench_config().procs == (1, 2)
    assert profile.reductions[0]["methods"] == ["uncurl"]


@pytest.mark.parametrize(
    "line, what, key, closest",
    [
        ("expert_count = [1, 8]", "profile 'p'", "expert_count", "expert_counts"),
        ("model = { n_embed = 64 }", "model", "n_embed", "n_embd"),
        ("train = { max_step = 10 }", "train", "max_step", "max_steps"),
        ("finetune = { patiense = 3 }", "finetune", "patiense", "patience"),
        (
            "task_finetune = { drama = { batch_token = 512 } }",
            "finetune",
            "batch_token",
            "batch_tokens",
        ),
        ("data = { vocab = 320 }", "preparation", "vocab", "vocab_size"),
        (
            'reductions = [{ source_n_experts = 4, target_n_expert = 2, methods = ["uncurl"] }]',
            "reductions",
            "source_n_experts",
            "source_n_expert",
        ),
        ("inference_bench = { repeat = 3 }", "inference_bench", "repeat", "repeats"),
    ],
)
def test_an_unknown_key_anywhere_names_itself_and_the_closest_known_key(
    tmp_path, line, what, key, closest
):
    message = f"unknown {what} key '{key}' (did you mean '{closest}'?)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load(tmp_path, line)


def test_an_unknown_key_far_from_any_known_one_lists_the_known_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown train key 'colour'; known: max_steps, lr, "):
        load(tmp_path, 'train = { colour = "red" }')


@pytest.mark.parametrize(
    "line, message",
    [
        ('train = { lr = "abc" }', "train key 'lr' must be float, got 'abc'"),
        (
            "model = { n_expert = 1.5 }",
            "model key 'n_expert' must be int | tuple[int, ...], got 1.5",
        ),
        ("train = { max_steps = true }", "train key 'max_steps' must be int, got True"),
        ("finetune = { seeds = 2.0 }", "finetune key 'seeds' must be int, got 2.0"),
        ('expert_counts = [1, "8"]', "profile 'p' key 'expert_counts' must be tuple[int, ...]"),
        (
            'reductions = [{ source_n_expert = 4, target_n_expert = 2, methods = "uncurl" }]',
            "reductions key 'methods' must be tuple[str, ...], got 'uncurl'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field_and_its_type(tmp_path, line, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load(tmp_path, line)


@pytest.mark.parametrize(
    "line, message",
    [
        ("train = { lr = -0.001 }", "lr must be positive, got -0.001"),
        (
            "model = { n_expert = 4, top_k = 8 }",
            "top_k=8 must be between 1 and the number of experts",
        ),
        ("model = { n_embd = 30, n_head = 4 }", "n_embd=30 must be divisible by n_head=4"),
        ("pretrain_seeds = [0, 0]", "pretrain_seeds = [0, 0] must list distinct seeds"),
        ("pretrain_seeds = []", "pretrain_seeds = [] must list distinct seeds"),
    ],
)
def test_a_value_out_of_range_fails_at_load_time(tmp_path, line, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load(tmp_path, line)


def test_an_unknown_profile_name_suggests_the_closest(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"unknown profile 'smoek' \(did you mean 'smoke'\?\)"):
        config.get_profile("smoek")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--profile", "smal", "--n-expert", "4", "--out", str(tmp_path / "X")])
    assert exit_info.value.code == 1
    assert "unknown profile 'smal' (did you mean 'small'?)" in capsys.readouterr().err


@pytest.mark.parametrize("prepared", [False, True], ids=["data not prepared", "data prepared"])
@pytest.mark.parametrize(
    "setting, message",
    [
        ("lr=abc", "train key 'lr' must be float, got 'abc'"),
        ("lr=-1e-3", "lr must be positive, got -0.001"),
        (
            "top_k=8",
            "top_k=8 must be between 1 and the number of experts (4): lower top_k or give "
            "more experts",
        ),
    ],
)
def test_a_bad_setting_on_the_command_line_is_one_line_and_writes_nothing(
    capsys, monkeypatch, tmp_path, smoke_data, prepared, setting, message
):
    monkeypatch.chdir(tmp_path)  # no data/prepared/ here: only --data gives the smoke data
    out = tmp_path / "X"
    argv = ["--profile", "smoke", "--n-expert", "4", "--out", str(out), "--set", setting]
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv + (["--data", str(smoke_data)] if prepared else []))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    name = setting.partition("=")[0]
    assert [line for line in err.splitlines() if name in line] == [
        f"python -m uncurl.train: error: {message}"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []
