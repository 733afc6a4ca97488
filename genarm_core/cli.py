"""Command line: `python -m genarm_core {profiles,generate,score,train} ...`."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .config import ConfigError, load_config


class CliError(Exception):
    pass


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
    from .data import jsonl_records

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
    from .engine import Engine
    from .models import load_models

    profile = load_config(args.config).profile(args.profile)
    return Engine(load_models(profile))


def cmd_profiles(args):
    config = load_config(args.config)
    for name, p in config.profiles.items():
        mark = "*" if name == config.default_profile else " "
        arms = ", ".join(f"{a.name} [{a.weight_min}, {a.weight_max}]" for a in p.arms) or "no ARMs"
        print(f"{mark} {name}: base {p.base.describe()}; {arms}")


def cmd_generate(args):
    prompts = read_prompts(args)
    weights = parse_weights(args.weight)
    engine = load_engine(args)
    options = sampling_options(args, engine.profile)
    if len(prompts) == 1 and not args.json:  # stream to the terminal
        for step in engine.stream(prompts[0], [weights], options):
            sys.stdout.write(step[0].text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    results = engine.generate(prompts, weights, options)
    for prompt, r in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "weights": weights, "text": r.text, "token_ids": r.token_ids,
                              "finish_reason": r.finish_reason, "logprobs_base": r.logprobs_base,
                              "logprobs_arms": r.logprobs_arms, "logprobs_fused": r.logprobs_fused,
                              "rewards": r.rewards(engine.models.betas)}, ensure_ascii=False))
        else:
            print(f"### {prompt}\n{r.text}\n")


def cmd_score(args):
    engine = load_engine(args)
    responses = args.response
    rewards = engine.score(args.prompt, responses)
    for response, r in zip(responses, rewards):
        if args.json:
            print(json.dumps({"prompt": args.prompt, "response": response, "rewards": r}, ensure_ascii=False))
        else:
            print("  ".join(f"{k}={v:.4f}" for k, v in r.items()), "|", response[:60])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m genarm_core",
                                     description="Reward-guided decoding with autoregressive reward models.")
    parser.add_argument("--config", help="models file (default: models.yaml, or $GENARM_MODELS)")
    parser.add_argument("--profile", help="profile name (default: the file's default_profile)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles", help="list the profiles").set_defaults(func=cmd_profiles)
    g = sub.add_parser("generate", help="generate with weighted ARMs")
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} per line")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("score", help="each ARM's trajectory reward of (prompt, response)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--response", action="append", required=True, help="a response (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)
    try:
        from .train import add_train_parser
    except ImportError:
        pass
    else:
        add_train_parser(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from .engine import RequestError
    from .models import ModelLoadError

    try:
        args.func(args)
    except (CliError, ConfigError, RequestError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
