"""Checkpoints: `model.safetensors` + `config.json` (+ tokenizer) in one folder, written atomically.

A folder is written under a temporary name and swapped in by rename, so an interruption leaves
either the previous checkpoint or the new one, never a mixture.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uncurl.config import ModelConfig
from uncurl.model import GPT

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_checkpoint(path, model: GPT, tokenizer=None, info: dict | None = None, state=None):
    """Write model, config, tokenizer and (for resuming) training state to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, tmp / MODEL_FILE)
    write_json(tmp / CONFIG_FILE, {"model": model.cfg.to_dict(), **(info or {})})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find_checkpoint(path) -> Path:
    """The checkpoint folder at `path`, or inside a training run folder at `path/checkpoint`."""
    path = Path(path)
    for candidate in (path, path / "checkpoint", path / ".checkpoint.old"):
        if (candidate / MODEL_FILE).exists() and (candidate / CONFIG_FILE).exists():
            return candidate
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected {MODEL_FILE} and {CONFIG_FILE} there or in "
        f"{path / 'checkpoint'} (train one with `python -m uncurl.train`)"
    )


def digest(path) -> str:
    """A short content hash of a checkpoint's weights and config: which model a result came from,
    whatever folder it sits in, so that work on a retrained model is never mistaken for done."""
    ckpt = find_checkpoint(path)
    h = hashlib.sha256()
    for name in (CONFIG_FILE, MODEL_FILE):
        with open(ckpt / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def read_info(path) -> dict:
    return json.loads((find_checkpoint(path) / CONFIG_FILE).read_text())


def load_model(path) -> GPT:
    """Load a checkpoint folder (or a training run folder) into a GPT in eval mode."""
    ckpt = find_checkpoint(path)
    model = GPT(ModelConfig.from_dict(read_info(ckpt)["model"]))
    state = load_file(ckpt / MODEL_FILE)
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_train_state(path) -> dict | None:
    """The optimizer/step state saved with a training checkpoint, or None if there is none."""
    try:
        f = find_checkpoint(path) / STATE_FILE
    except FileNotFoundError:
        return None
    return torch.load(f, weights_only=False) if f.exists() else None
