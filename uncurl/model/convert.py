"""Rewrite checkpoints of the first form in place into the current one, the weights untouched.

    python -m uncurl.model.convert runs/small/e16 runs/small/reduced/e32-uncurl-d8-bbc_news

The first form's config.json is {"model": ModelConfig's fields, **what made the model}, which only
`uncurl.model.load_model` reads; the current form is transformers' (`uncurl.model.checkpoint`),
which `AutoModelForCausalLM.from_pretrained` also loads. The generation config and the shims are
written first and config.json is replaced last, atomically, so a conversion stopped at any moment
leaves a checkpoint of one form or the other (run the command again). The checkpoint's `digest`
does not change. Convert a folder only while nothing else writes it.
"""

import argparse
from pathlib import Path

from uncurl.cli import one_line_errors
from uncurl.model.checkpoint import (
    find_checkpoint,
    load_model,
    load_tokenizer,
    read_config,
    read_info,
    write_config,
)
from uncurl.model.hf import MODEL_TYPE

PROG = "python -m uncurl.model.convert"


def convert(path) -> bool:
    """Convert the checkpoint at `path` (or in the training run folder `path`); False if it is
    in the current form already."""
    ckpt = find_checkpoint(path)
    if read_config(ckpt).get("model_type") == MODEL_TYPE:
        return False
    made_by = {k: v for k, v in read_info(ckpt).items() if k != "model"}
    model = load_model(ckpt)  # refuses a checkpoint that is not whole; gives the weights' dtype
    write_config(ckpt, model.cfg, made_by, model.wte.weight.dtype, load_tokenizer(ckpt))
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="checkpoint folders or training run folders")
    args = p.parse_args(argv)
    with one_line_errors(PROG):
        for path in args.paths:
            print(f"{path}: {'converted' if convert(path) else 'already in the current form'}")


if __name__ == "__main__":
    main()
