"""What several subcommands share: weights, prompts and sampling options from the command line."""
from __future__ import annotations

import argparse
import math

from ..config import load_config
from ..errors import CliError


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
    p.add_argument("--weight", action="append", metavar="NAME=VALUE",
                   help="weight of one ARM (repeat for each); ARMs not named get 0")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the profile's)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--normalised", action="store_true", default=None,
                   help="divide the fused score by 1 + sum of weights (constant sharpness)")
    p.add_argument("--min-p", type=float, help="keep tokens with p >= min_p * top p (0 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 pushes down tokens already in the context")
    p.add_argument("--no-repeat-ngram-size", type=int, help="ban tokens that would repeat an n-gram (0 = off)")


SAMPLING_ARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
                 "max_new_tokens", "seed", "normalised")


def sampling_options(args, profile):
    """The profile's defaults with what the command line sets."""
    from dataclasses import replace

    given = {name: getattr(args, name) for name in SAMPLING_ARGS if getattr(args, name, None) is not None}
    return replace(profile.defaults, **given, **({"stop": tuple(args.stop)} if args.stop else {}))


def load_engine(args):
    from ..engine import Engine
    from ..models import load_models

    profile = load_config(args.config).profile(args.profile)
    return Engine(load_models(profile))
