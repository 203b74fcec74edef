"""Our labelled tasks scored by the field's evaluation harness (lm-evaluation-harness, PyPI
`lm-eval`, the `eval` extra) beside our own scoring, example by example.

    python -m uncurl.harness --checkpoint runs/small/e8 --profile small

`write_tasks` writes each labelled task as an lm-eval task (a YAML file and a jsonl file of its
examples) over the validation examples `load_task` scores (the stable subset): the prompt our
model sees (the text cut to fit, decoded, then the query) and the candidate answers, each with
its leading space (so `target_delimiter` is empty); `output_type: multiple_choice`, metric `acc`.
`run_lm_eval` runs `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on
them, offline, and `compare` sets lm-eval's per-example accuracy beside
`uncurl.evaluate.correct`'s.

lm-eval tokenises text, not our token ids: it encodes the prompt, and prompt + answer whole,
takes the answer's ids past the prompt's length, and cuts the sequence to the model's context
from the left. Where that gives other ids than ours (a text cut inside a word, or inside a
character's bytes, decodes to a string that tokenises otherwise), the two scorers read different
inputs and may disagree: `compare` counts those examples and also scores our model on lm-eval's
ids, which must give lm-eval's answer on every example.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from uncurl import layout
from uncurl.cli import one_line_errors
from uncurl.config import get_profile
from uncurl.evaluate import answer_logliks, correct
from uncurl.model.checkpoint import find_checkpoint, load_model, load_tokenizer
from uncurl.tasks import Encoded, get_task, load_task

PROG = "python -m uncurl.harness"
PREFIX = "uncurl_"  # lm-eval task names: ours, apart from lm-eval's own tasks
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def as_text(tok, encoded: list[Encoded]) -> list[dict]:
    """Each example as lm-eval reads it: the prompt and answers our model sees, as text."""
    return [
        {"prompt": decode(tok, e.prompt), "choices": [decode(tok, c) for c in e.choices]}
        | {"label": e.label}
        for e in encoded
    ]


def lm_eval_pairs(tok, doc: dict, block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (context, answer) ids lm-eval scores for each candidate of `doc`, as it does for
    causal models: the prompt's trailing whitespace moved to the answer, the prompt encoded
    alone, the answer as the ids of prompt + answer past the prompt's length, the whole cut from
    the left to block_size + 1 tokens."""
    prompt = doc["prompt"].rstrip()
    context = tok.encode(prompt)
    pairs = []
    for choice in doc["choices"]:
        answer = tok.encode(doc["prompt"] + choice)[len(context) :]
        kept = (context + answer)[-(block_size + 1) :]
        pairs.append((np.array(kept[: len(kept) - len(answer)]), np.array(answer)))
    return pairs


def write_tasks(folder, docs: dict[str, list[dict]]) -> Path:
    """One lm-eval task per labelled task over its examples `docs[task]`: `<task>.jsonl` and
    `uncurl_<task>.yaml` (written as JSON, which is YAML) in `folder`."""
    folder = Path(folder).resolve()
    for task, rows in docs.items():
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        data = layout.write_text(folder / f"{task}.jsonl", lines)
        spec = {
            "task": PREFIX + task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data)}},
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "doc_to_text": "prompt",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": "",  # our answers start with their separating space
            "metric_list": [{"metric": "acc"}],
        }
        layout.write_json(folder / f"{PREFIX}{task}.yaml", spec)
    return folder


def run_lm_eval(checkpoint, task_folder, tasks: list[str], out, batch_size: int = 32) -> dict:
    """lm-eval's per-example records (its samples, by doc_id) of each task, scoring the
    checkpoint folder through `AutoModelForCausalLM` (with trust_remote_code: lm-eval does not
    import uncurl), offline, its caches under `out`."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("lm-eval is not installed: pip install -e '.[eval]' (or uncurl[eval])")
    out = Path(out).resolve()
    shutil.rmtree(out / "lm_eval", ignore_errors=True)  # one run's samples per task
    command = [
        *(sys.executable, "-m", "lm_eval", "--model", "hf"),
        *("--model_args", f"pretrained={find_checkpoint(checkpoint)},trust_remote_code=True"),
        *("--tasks", ",".join(PREFIX + t for t in tasks), "--include_path", str(task_folder)),
        *("--batch_size", str(batch_size), "--device", "cpu"),
        *("--output_path", str(out / "lm_eval"), "--log_samples"),
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out / "hf")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"lm_eval failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    samples = {}
    for task in tasks:
        (path,) = (out / "lm_eval").rglob(f"samples_{PREFIX}{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


def compare(model, tok, encoded: list[Encoded], docs: list[dict], samples: list[dict]) -> dict:
    """Our per-example accuracy and lm-eval's on the same examples, where they differ, and
    why: the examples lm-eval tokenises otherwise, and our model on lm-eval's ids."""
    block = model.cfg.block_size
    ours, theirs = correct(model, encoded), np.array([float(s["acc"]) for s in samples])
    pairs = [lm_eval_pairs(tok, d, block) for d in docs]
    alike = [tokenised_alike(p, e) for p, e in zip(pairs, encoded, strict=True)]
    flat = iter(answer_logliks(model, [pair for p in pairs for pair in p]))
    picks = [int(np.argmax([next(flat) for _ in p])) for p in pairs]
    on_their_ids = (np.array(picks) == [e.label for e in encoded]).astype(float)
    differ = np.flatnonzero(ours != theirs)
    return {
        "examples": len(encoded),
        "ours": float(ours.mean()),
        "lm_eval": float(theirs.mean()),
        "agree": int((ours == theirs).sum()),
        "tokenised_otherwise": int(len(alike) - sum(alike)),
        "differ": differ.tolist(),  # doc_ids: the order of the jsonl file
        "differ_tokenised_alike": [int(i) for i in differ if alike[i]],
        "ours_on_their_ids_agree": int((on_their_ids == theirs).sum()),
        "prompts_as_written": all(
            _arguments(s) == _requests(d) for s, d in zip(samples, docs, strict=True)
        ),
    }


def tokenised_alike(pairs, e: Encoded) -> bool:
    """Whether lm-eval's (context, answer) ids (`lm_eval_pairs`) are ours, for every answer."""
    return all(
        np.array_equal(context, e.prompt) and np.array_equal(answer, ours)
        for (context, answer), ours in zip(pairs, e.choices, strict=True)
    )


def _requests(doc: dict) -> list[list[str]]:
    return [[doc["prompt"], c] for c in doc["choices"]]


def _arguments(sample: dict) -> list[list[str]]:
    """The (context, continuation) strings lm-eval scored for one example."""
    return [[a["arg_0"], a["arg_1"]] for a in sample["arguments"].values()]


def cross_check(checkpoint, profile, tasks=None, out="build/harness", batch_size: int = 32):
    """Every labelled task of `profile` (or `tasks`) scored by lm-eval and by us on the
    checkpoint: one row per task (`compare`'s fields)."""
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    names = [t for t in tasks or profile.all_tasks if get_task(t).kind == "choice"]
    encoded = {
        t: load_task(
            t, tok, model.cfg.block_size, profile.finetune_config(t), None, profile.task_source
        ).val
        for t in names
    }
    docs = {t: as_text(tok, enc) for t, enc in encoded.items()}
    folder = write_tasks(Path(out) / "tasks", docs)
    samples = run_lm_eval(checkpoint, folder, names, out, batch_size)
    rows = [{"task": t, **compare(model, tok, encoded[t], docs[t], samples[t])} for t in names]
    return pd.DataFrame(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder")
    p.add_argument("--profile", default="small", help="whose task data and sizes to use")
    p.add_argument("--tasks", nargs="*", help="labelled tasks (default: the profile's)")
    p.add_argument("--out", type=Path, default=Path("build/harness"), help="task files, logs")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    with one_line_errors(PROG):
        table = cross_check(
            args.checkpoint, get_profile(args.profile), args.tasks, args.out, args.batch_size
        )
    layout.write_text(args.out / "cross_check.csv", table.to_csv(index=False))
    columns = ["task", "examples", "ours", "lm_eval", "agree", "tokenised_otherwise"]
    print(table[columns].to_string(index=False))


if __name__ == "__main__":
    main()
