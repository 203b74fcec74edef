"""A checkpoint save SIGKILLed at every stage leaves the previous checkpoint or the new one, each
whole, or (between the two renames only) an error that says how to recover; never a part."""

import logging

import pytest
import torch
from conftest import killed

from uncurl import layout
from uncurl.config import ModelConfig
from uncurl.model import GPT
from uncurl.model.checkpoint import find_checkpoint, load_model, read_info, save_checkpoint

CFG = ModelConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=2)
SAVES = """
import sys, torch
from uncurl import data
from uncurl.config import ModelConfig
from uncurl.model import GPT
from uncurl.model.checkpoint import save_checkpoint
folder, data_dir, cfg = sys.argv[1], sys.argv[2], eval("ModelConfig" + sys.argv[3])
for seed in (0, 1):  # the second save replaces the first
    torch.manual_seed(seed)
    save_checkpoint(folder, GPT(cfg), data.load_tokenizer(data_dir), {"seed": seed}, {"seed": seed})
"""


def model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def assert_whole(folder, seed: int) -> None:
    assert read_info(folder)["seed"] == seed
    for p, q in zip(load_model(folder).parameters(), model(seed).parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "target, nth, match, after, reader_sees",
    [
        ("uncurl.model.checkpoint.save_file", 2, "", True, 0),  # the new weights, in a temporary
        ("torch.save", 2, "", False, 0),  # weights, config and tokenizer, no training state yet
        ("os.replace", 1, ".ckpt.old", True, None),  # the previous one moved aside, the new not in
        ("os.replace", 2, ".ckpt.old", False, 1),  # the new one in, the previous still aside
        ("os.replace", 2, ".ckpt.old", True, 1),  # the previous one renamed for deletion
    ],
    ids=["weights", "state", "between-renames", "after-renames", "deleting-previous"],
)
def test_a_save_killed_at_any_stage_leaves_a_whole_checkpoint(
    tmp_path, smoke_data, caplog, target, nth, match, after, reader_sees
):
    folder = tmp_path / "ckpt"
    argv = [str(folder), str(smoke_data), repr(CFG).removeprefix("ModelConfig")]
    killed(target, nth, ["-c", SAVES, *argv], match=match, after=after)
    assert [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]  # what the kill left
    if reader_sees is None:
        with pytest.raises(FileNotFoundError, match=r"a save there was interrupted.*rerun"):
            find_checkpoint(folder)  # a reader never guesses, nor moves anything
        with caplog.at_level(logging.WARNING):
            assert layout.recover_dir(folder)  # what the writer's rerun does first
        assert "died between its two renames" in caplog.text
        reader_sees = 0
    assert_whole(folder, reader_sees)
    save_checkpoint(folder, model(2), None, {"seed": 2})  # a rerun's save clears the leftovers
    assert_whole(folder, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
