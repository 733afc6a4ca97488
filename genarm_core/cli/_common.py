"""What several subcommands share: weights, prompts and sampling options from the command line."""
from __future__ import annotations

import argparse
import math

from ..config import load_config
from ..errors import CliError
from ..request import SAMPLING_FIELDS, SAMPLING_NAMES, options


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--weight {item!r}: expected NAME=VALUE, e.g. --weight helpfulness=1.5")
        try:
            w = float(value)
        except ValueError:
            raise CliError(f"--weight {item!r}: '{value}' is not a number") from None
        if not math.isfinite(w):
            raise CliError(f"--weight {item!r}: expected a finite number")
        if name in weights:
            raise CliError(f"--weight: '{name}' given twice")
        weights[name] = w
    return weights


def read_prompts(args) -> list:
    if (args.prompt is None) == (args.prompts is None):
        raise CliError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if args.prompt is not None:
        return [args.prompt]
    from ..data import jsonl_records

    prompts = []
    for n, record in jsonl_records(args.prompts, "prompts"):
        prompt = record.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise CliError(f"{args.prompts}:{n}: expected an object with a 'prompt' string or message list")
        prompts.append(prompt)
    if not prompts:
        raise CliError(f"--prompts {args.prompts}: no prompts in the file")
    return prompts


def add_sampling_args(p: argparse.ArgumentParser):
    """--weight NAME=VALUE, and one flag per sampling option of the request schema (request.py)."""
    p.add_argument("--weight", action="append", metavar="NAME=VALUE",
                   help="weight of one ARM (repeat for each); ARMs not named get 0")
    for f in SAMPLING_FIELDS:
        flag, text = "--" + f.name.replace("_", "-"), f"{f.help} (default: the profile's)"
        if f.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.annotation == list[str]:
            p.add_argument(flag, action="append", metavar="TEXT", help=f"{f.help} (repeatable)")
        else:
            p.add_argument(flag, type=f.annotation, help=text)


def sampling_options(args, profile):
    """The profile's defaults with what the command line sets, checked by the request schema."""
    return options({name: getattr(args, name, None) for name in SAMPLING_NAMES}, profile.defaults,
                   names={n: "--" + n.replace("_", "-") for n in SAMPLING_NAMES})


def load_engine(args):
    from ..engine import Engine
    from ..models import load_models

    profile = load_config(args.config).profile(args.profile)
    return Engine(load_models(profile))
