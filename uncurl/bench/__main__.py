"""python -m uncurl.bench {moe,reduce,inference,finetune,gpu} ...: each prints tables of times
and ratios."""

import argparse
import json

from uncurl import layout
from uncurl.bench import finetune, gpu, inference, moe, reduce


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uncurl.bench", description=__doc__)
    sub = p.add_subparsers(dest="bench", required=True)
    moe.add_arguments(sub.add_parser("moe", help=moe.__doc__.split("\n")[0]))
    reduce.add_arguments(sub.add_parser("reduce", help=reduce.__doc__.split("\n")[0]))
    inference.add_arguments(sub.add_parser("inference", help=inference.__doc__.split("\n")[0]))
    finetune.add_arguments(sub.add_parser("finetune", help=finetune.__doc__.split("\n")[0]))
    gpu.add_arguments(sub.add_parser("gpu", help=gpu.__doc__.split("\n")[0]))
    args = p.parse_args(argv)
    runs = {"moe": moe.run, "reduce": reduce.run, "inference": inference.run}
    runs |= {"gpu": gpu.run, "finetune": finetune.run}
    result = runs[args.bench](args)
    if args.json:
        layout.write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
