"""Command line: `python -m genarm_core {profiles,generate,score,train,votes} ...`.

Each subcommand is a module here with `register(subparsers)` (its options) and `run(args)`; the
library never imports this package. Every error the library raises on purpose (GenarmError:
config, model loading, requests, data, training) ends the command with its message and exit
code 2, here and nowhere else.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import GenarmError
from . import generate, profiles, score, train, votes

SUBCOMMANDS = (profiles, generate, score, train, votes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m genarm_core",
                                     description="Reward-guided decoding with autoregressive reward models.")
    parser.add_argument("--config", help="models file (default: models.yaml, or $GENARM_MODELS)")
    parser.add_argument("--profile", help="profile name (default: the file's default_profile)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GenarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
