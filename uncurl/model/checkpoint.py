"""Checkpoints: `model.safetensors` + `config.json` (+ generation config, tokenizer, training
state) in one folder, written atomically (`uncurl.layout.atomic_dir`): an interruption leaves the
previous checkpoint or the new one, never a part of one under the checkpoint's name.

The folder is also a transformers checkpoint (`uncurl.model.hf`): config.json holds our model's
fields in transformers' form, with what made the model (training, reduction, fine-tuning) under
the key "uncurl", and `AutoModelForCausalLM.from_pretrained` loads it. Checkpoints of the first
form (config.json = {"model": fields, **what made it}) still load here; `python -m
uncurl.model.convert DIR` rewrites one into the current form.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from uncurl import layout
from uncurl.config import ModelConfig
from uncurl.model.gpt import GPT
from uncurl.model.hf import (
    INFO_KEY,
    MODEL_FIELDS,
    MODEL_TYPE,
    UncurlConfig,
    generation_config,
    write_shims,
)

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"
GENERATION_FILE = "generation_config.json"


def save_checkpoint(path, model: GPT, tokenizer=None, info: dict | None = None, state=None):
    """Write model, config, tokenizer and (for resuming) training state to `path` atomically."""
    with layout.atomic_dir(path) as tmp:
        write_checkpoint(tmp, model, tokenizer, info, state)
    return Path(path)


def write_checkpoint(
    folder: Path, model: GPT, tokenizer=None, info: dict | None = None, state=None
) -> None:
    """The checkpoint's files into an existing (temporary) folder: those `save_pretrained` of the
    model as an `UncurlForCausalLM` writes, then the tokenizer and the training state."""
    write_weights(folder, model.cfg, model.state_dict(), tokenizer, info, state)


def write_weights(
    folder: Path, cfg: ModelConfig, weights: dict, tokenizer=None, info=None, state=None
) -> None:
    """`write_checkpoint` from a GPT's state dict (on any device) rather than the GPT."""
    weights = {
        k: v.detach().cpu().contiguous() for k, v in weights.items() if k != "lm_head.weight"
    }
    save_file(weights, folder / MODEL_FILE, metadata={"format": "pt"})
    write_config(folder, cfg, info, weights["wte.weight"].dtype, tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if state is not None:
        torch.save(state, folder / STATE_FILE)


def write_config(folder, cfg: ModelConfig, info: dict | None, dtype, tokenizer=None) -> None:
    """config.json in transformers' form (`info` under INFO_KEY), the generation config and the
    shims config.json's `auto_map` names; config.json last and atomically, so that a folder
    being converted is in one form or the other."""
    folder = Path(folder)
    generation_config(tokenizer).to_json_file(folder / GENERATION_FILE)
    write_shims(folder)
    layout.write_text(folder / CONFIG_FILE, UncurlConfig.of(cfg, info, dtype).to_json_string())


def find_checkpoint(path) -> Path:
    """The checkpoint folder at `path`, or inside a training run folder at `path/checkpoint`.

    Only a whole checkpoint ever has either name (`layout.atomic_dir`). A reader never recovers
    one that an interrupted save moved aside: that is the writer's to do, under its lock, when
    its command is rerun; the error says so.
    """
    path = Path(path)
    for candidate in (path, path / layout.CHECKPOINT):
        if (candidate / MODEL_FILE).exists() and (candidate / CONFIG_FILE).exists():
            return candidate
    for candidate in (path, path / layout.CHECKPOINT):
        if layout.moved_aside(candidate).exists():
            raise FileNotFoundError(
                f"no checkpoint at {candidate}: a save there was interrupted, and the previous "
                f"checkpoint waits in {layout.moved_aside(candidate)}; rerun the command that "
                f"wrote it (it puts that back and resumes)"
            )
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected {MODEL_FILE} and {CONFIG_FILE} there or in "
        f"{path / layout.CHECKPOINT} (train one with `python -m uncurl.train`)"
    )


def digest(path) -> str:
    """A short content hash of a checkpoint's settings and record (`read_info`, the same for
    either form of config.json) and weights: which model a result came from, whatever folder it
    sits in, so that work on a retrained model is never mistaken for done."""
    ckpt = find_checkpoint(path)
    h = hashlib.sha256(json.dumps(read_info(ckpt), sort_keys=True).encode())
    with open(ckpt / MODEL_FILE, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def read_info(path) -> dict:
    """The model's settings and what made it: {"model": ModelConfig's fields, "train": ...,
    "reduction": ..., ...}, from config.json in either form."""
    config = read_config(path)
    if config.get("model_type") != MODEL_TYPE:
        return config  # the first form
    fields = {f.name: config[f.name] for f in MODEL_FIELDS if f.name in config}
    return {"model": fields, **(config.get(INFO_KEY) or {})}


def read_config(path) -> dict:
    """The checkpoint's config.json as it is, in either form; an error if it is neither."""
    ckpt = find_checkpoint(path)
    config = layout.read_json(ckpt / CONFIG_FILE)
    if isinstance(config, dict) and (
        config.get("model_type") == MODEL_TYPE or isinstance(config.get("model"), dict)
    ):
        return config
    raise ValueError(
        f"{ckpt} is not an uncurl checkpoint: its {CONFIG_FILE} has no model settings; give "
        f"a folder written by uncurl.train, uncurl.reduce or uncurl.finetune --save-model"
    )


def load_model(path) -> GPT:
    """Load a checkpoint folder (or a training run folder) into a GPT in eval mode."""
    ckpt = find_checkpoint(path)
    model = GPT(ModelConfig.from_dict(read_info(ckpt)["model"]))
    try:
        state = load_weights(ckpt)
    except SafetensorError as e:
        raise ValueError(
            f"{ckpt / MODEL_FILE} is truncated or corrupt ({e}): restore it, or write the "
            "checkpoint again"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"the weights in {ckpt} do not fit its {CONFIG_FILE} ({first}): the two files "
            "come from different models; restore the checkpoint or write it again"
        ) from None
    return model.eval()


def load_weights(path) -> dict:
    """A checkpoint's weights as a GPT's state dict (the tied output head included), on the CPU."""
    state = load_file(find_checkpoint(path) / MODEL_FILE)
    state["lm_head.weight"] = state.get("wte.weight")
    return state


def load_train_state(path) -> dict | None:
    """The optimizer/step state saved with a training checkpoint, or None if there is none."""
    try:
        f = find_checkpoint(path) / STATE_FILE
    except FileNotFoundError:
        return None
    return torch.load(f, weights_only=False) if f.exists() else None


def load_tokenizer(path):
    """The tokenizer saved with a checkpoint, or None if it has none."""
    ckpt = find_checkpoint(path)
    return AutoTokenizer.from_pretrained(ckpt) if (ckpt / "tokenizer.json").exists() else None
