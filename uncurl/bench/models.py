"""The models a benchmark measures: the profile's pretrained runs (or, without them, random
initialisations at the profile's shapes) and its reductions, and the tokens they are fed."""

import torch

from uncurl import layout
from uncurl.config import ModelConfig
from uncurl.model import GPT, load_model
from uncurl.model.checkpoint import find_checkpoint, read_info

SEED = 0


def find_models(runs, profile) -> list[dict]:
    """The profile's models: dense and each expert count (trained, else random init), then every
    reduction of seed 0 on the profile's first task under {runs}/{profile}/reduced/ (the other
    seeds and tasks give the same shapes), with what it came from."""
    folders = layout.Runs(runs, profile.name)
    models = [_trained_or_random(folders, profile, n) for n in profile.expert_counts]
    first = profile.all_tasks[0] if profile.all_tasks else None
    for path in folders.reductions(seed=0):
        if layout.parse_reduced(path.name)["task"] != first:
            continue
        try:
            ckpt = find_checkpoint(path)
        except FileNotFoundError:
            continue
        models.append(_reduced(path, ckpt, read_info(ckpt)))
    return models


def _trained_or_random(folders: layout.Runs, profile, n_expert: int) -> dict:
    run, name = folders.pretrained(n_expert), layout.model_label(n_expert)
    try:
        info = read_info(run)
    except FileNotFoundError:
        return _spec(name, "random init", profile.model_config(n_expert=n_expert).to_dict())
    return _spec(name, "trained", info["model"], run, _val_loss(run))


def _reduced(path, ckpt, info: dict) -> dict:
    """A reduction, with the labels of the model it came from and of its from-scratch
    equivalent (when every layer has the same count)."""
    red = info.get("reduction", {})
    counts = info["model"]["n_expert"]
    counts = counts if isinstance(counts, list) else [counts]
    sources = red.get("source_n_expert", [])
    source = layout.model_label(sources[0]) if len(set(sources)) == 1 else None
    equivalent = layout.model_label(counts[0]) if len(set(counts)) == 1 else None
    return _spec(
        f"reduced/{path.name}",
        "reduced",
        info["model"],
        ckpt,
        _val_loss(path),
        source=source,
        method=red.get("method"),
        equivalent=equivalent,
    )


def _spec(name, kind, model: dict, path=None, val_loss=None, **extra) -> dict:
    return {
        "name": name,
        "kind": kind,
        "model": model,
        "path": str(path) if path else None,
        "val_loss": val_loss,
        "n_expert": model["n_expert"],
        **extra,
    }


def _val_loss(folder) -> float | None:
    summary = folder / layout.SUMMARY
    return layout.read_json(summary).get("val_loss") if summary.exists() else None


def build_model(spec: dict) -> GPT:
    """The model a spec names: its checkpoint, or a seeded random initialisation."""
    if spec["path"]:
        return load_model(spec["path"])
    torch.manual_seed(SEED)
    return GPT(ModelConfig.from_dict(spec["model"])).eval()


def batch_tokens(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the models' block_size {cfg.block_size}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
