"""Our SMoE as a transformers model: every checkpoint the library writes loads with
`AutoModelForCausalLM.from_pretrained` (with uncurl imported, or with trust_remote_code without
it) to the same weights and logits as `load_model`; `save_pretrained` writes the same files again;
`generate()` runs without a KV cache; first-form checkpoints still load and convert in place."""

import dataclasses
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, killed
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from uncurl import data, finetune, layout, tasks
from uncurl.config import ModelConfig, ReduceConfig, get_profile
from uncurl.model import GPT, UncurlConfig, UncurlForCausalLM, load_model
from uncurl.model.checkpoint import digest, find_checkpoint, load_tokenizer, read_config, read_info
from uncurl.model.convert import main as convert_main
from uncurl.reduce import reduce_model
from uncurl.reduce.save import reduce_checkpoint
from uncurl.train import train

SMOKE = get_profile("smoke")
SAMPLES = str(ROOT / "tests" / "fixtures" / "tasks")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def written(smoke_data, tmp_path_factory) -> dict:
    """A checkpoint of each kind the study writes: pretrained, reduced, fine-tuned --save-model."""
    root = tmp_path_factory.mktemp("written")
    cfg = SMOKE.model_config(n_expert=4, vocab_size=320)
    train(root / "e4", cfg, SMOKE.train_config(max_steps=2), smoke_data, progress=False)
    docs = [np.asarray(data.load_tokens(smoke_data, "train")[:4000], dtype=np.int64)]
    reduced = reduce_checkpoint(
        root / "e4", root / "reduced", "uncurl", 2, docs, "smoke", ReduceConfig(max_tokens=1024)
    )
    tune = SMOKE.finetune_config(max_steps=2, eval_interval=1, max_val=8, max_heldout=4)
    finetune.run(root / "e4", "rotten_tomatoes", 0, root / "ft", tune, smoke_data, SAMPLES, True)
    return {
        "pretrained": find_checkpoint(root / "e4"),
        "reduced": reduced,
        "finetuned": root / "ft" / "model",
    }


def assert_same_model(hf: UncurlForCausalLM, gpt: GPT) -> None:
    """The same weights, bit for bit, the head tied, and the same logits in eval mode."""
    ours = gpt.state_dict()
    assert hf.gpt.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in hf.gpt.state_dict().items())
    assert hf.gpt.lm_head.weight is hf.gpt.wte.weight
    idx = torch.randint(0, gpt.cfg.vocab_size, (3, gpt.cfg.block_size))
    assert not hf.training
    assert torch.equal(hf(idx).logits, gpt(idx, dropless=True).logits)


@pytest.mark.parametrize("kind", ["pretrained", "reduced", "finetuned"])
def test_every_checkpoint_the_library_writes_loads_with_from_pretrained(written, kind):
    folder = written[kind]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(hf, UncurlForCausalLM)
    assert_same_model(hf, load_model(folder))
    config = read_config(folder)
    assert config["model_type"] == "uncurl" and config["architectures"] == ["UncurlForCausalLM"]
    info = read_info(folder)  # the shape every caller reads
    assert info["model"] == hf.config.model_config().to_dict()
    made_by = {"pretrained": "train", "reduced": "reduction", "finetuned": "finetune"}[kind]
    assert made_by in info and info[made_by] == config["uncurl"][made_by]


def test_save_pretrained_writes_the_same_files_and_loads_back_bitwise(written, tmp_path):
    folder = written["reduced"]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "again")
    saved = sorted(os.listdir(tmp_path / "again"))
    assert saved == sorted(
        ["config.json", "generation_config.json", "model.safetensors"]
        + ["configuration_uncurl.py", "modeling_uncurl.py"]
    )
    for name in saved:  # byte for byte what the library wrote
        assert filecmp.cmp(tmp_path / "again" / name, folder / name, shallow=False), name
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), load_model(folder))
    assert digest(tmp_path / "again") == digest(folder)


def test_without_uncurl_imported_it_loads_with_trust_remote_code(written, tmp_path):
    """A fresh process that never imports uncurl itself: refused without trust_remote_code, and
    with it the checkpoint's shims import the installed uncurl."""
    code = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as e:
    print("refused:", "trust_remote_code=True" in str(e))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
out = model.generate(max_new_tokens=3, min_new_tokens=3, do_sample=False)
print(type(model).__module__, type(model).__name__, list(out.shape))
"""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's uncurl, the one installed in development
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(written["pretrained"])],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # after transformers' question and why it refuses
    assert lines[-2].endswith("refused: True")
    assert lines[-1] == "uncurl.model.hf UncurlForCausalLM [1, 4]"  # from BOS: 3 new tokens


def test_generate_is_greedy_decoding_over_the_last_block_of_tokens(written):
    """No KV cache: each step reruns the sequence, cut to the context, past block_size too."""
    hf = AutoModelForCausalLM.from_pretrained(written["pretrained"])
    gpt, window = hf.gpt, hf.config.block_size
    prompt = torch.randint(0, gpt.cfg.vocab_size, (2, 20))
    steps = window  # the sequence grows past the context
    out = hf.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None)
    seq = prompt
    for _ in range(steps):
        step = gpt(seq[:, -window:], dropless=True).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, step], dim=1)
    assert torch.equal(out, seq)


def test_forward_right_padding_labels_and_dropless_scoring(smoke_data):
    torch.manual_seed(0)  # an MoE whose evaluation capacity would drop tokens of a large batch
    cfg = SMOKE.model_config(vocab_size=320, n_expert=4, eval_capacity_factor=1.0, min_capacity=1)
    hf = UncurlForCausalLM(UncurlConfig.of(cfg)).eval()
    idx = torch.randint(0, 320, (4, 12))
    alone = torch.cat([hf(row[None]).logits for row in idx])
    assert torch.equal(hf(idx).logits, alone)  # a token's logits do not depend on its batch
    mask = torch.ones_like(idx)
    mask[1, 7:] = 0  # right padding: the real tokens' logits are unchanged
    assert torch.equal(hf(idx, attention_mask=mask).logits[1, :7], hf(idx[1:2, :7]).logits[0])
    with pytest.raises(ValueError, match="pads on the left"):
        hf(idx, attention_mask=mask.flip(1))
    labels = idx.clone()
    labels[1, 7:] = -100
    logits = hf(idx).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(hf(idx, labels=labels).loss, want)


def test_the_config_declares_model_configs_fields_and_refuses_what_it_refuses():
    declared = {f.name for f in dataclasses.fields(UncurlConfig)}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= declared
    cfg = ModelConfig(n_expert=(2, 4), n_layer=4)
    assert UncurlConfig.of(cfg).model_config() == cfg
    with pytest.raises(ValueError, match="must be divisible by n_head"):
        UncurlConfig(n_embd=30, n_head=4)


def test_reducing_the_transformers_model_reduces_its_gpt_through_the_same_adapter(written):
    hf = AutoModelForCausalLM.from_pretrained(written["pretrained"])
    gpt = load_model(written["pretrained"])
    tok = load_tokenizer(written["pretrained"])
    exs = tasks.examples(tasks.get_task("rotten_tomatoes"), SAMPLES)["train"]
    docs = tasks.answered(tasks.encode(tok, exs, gpt.cfg.block_size))
    batches = tasks.make_batches(docs, gpt.cfg.block_size, 8, 1024)
    reduced_hf, record_hf = reduce_model(hf, batches, "uncurl", 2)
    reduced, record = reduce_model(gpt, batches, "uncurl", 2)
    assert isinstance(reduced_hf, UncurlForCausalLM) and record_hf["plan"] == record["plan"]
    assert_same_model(reduced_hf, reduced)


def first_form(folder, cfg: ModelConfig, made_by: dict):
    """A checkpoint as the library wrote them before config.json took transformers' form."""
    torch.manual_seed(0)
    gpt = GPT(cfg)
    weights = {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    folder.mkdir()
    save_file(weights, folder / "model.safetensors")
    layout.write_json(folder / "config.json", {"model": cfg.to_dict(), **made_by})
    return gpt.eval()


def test_a_first_form_checkpoint_loads_and_converts_in_place(tmp_path, capsys):
    made_by = {"train": {"seed": 0, "lr": 0.003}, "data": "somewhere", "step": 2}
    folder = tmp_path / "run" / "checkpoint"
    folder.parent.mkdir()
    gpt = first_form(folder, SMOKE.model_config(n_expert=4, vocab_size=320), made_by)
    weights, before = (folder / "model.safetensors").read_bytes(), digest(folder)
    assert_same_model(UncurlForCausalLM.wrapping(load_model(folder)), gpt)  # still loads
    with pytest.raises(ValueError, match="model_type"):
        AutoModelForCausalLM.from_pretrained(folder)
    convert_main([str(tmp_path / "run")])  # a training run folder, or the checkpoint itself
    convert_main([str(folder)])
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'run'}: converted",
        f"{folder}: already in the current form",
    ]
    assert (folder / "model.safetensors").read_bytes() == weights  # untouched
    assert read_info(folder) == {"model": gpt.cfg.to_dict(), **made_by}
    assert digest(folder) == before  # results recorded against it still count
    assert_same_model(AutoModelForCausalLM.from_pretrained(folder), gpt)
    assert_same_model(UncurlForCausalLM.wrapping(load_model(folder)), gpt)


def test_a_conversion_killed_before_its_last_rename_leaves_the_first_form(tmp_path):
    folder = tmp_path / "ckpt"
    gpt = first_form(folder, SMOKE.model_config(n_expert=2, vocab_size=320), {"step": 1})
    first = (folder / "config.json").read_bytes()
    killed("os.replace", 1, ["-m", "uncurl.model.convert", str(folder)], match="config.json")
    assert (folder / "config.json").read_bytes() == first
    assert_same_model(UncurlForCausalLM.wrapping(load_model(folder)), gpt)
    convert_main([str(folder)])  # run again: done
    assert json.loads((folder / "config.json").read_text())["model_type"] == "uncurl"
