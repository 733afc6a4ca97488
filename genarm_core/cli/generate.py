"""`generate`: fused decoding with weighted ARMs, streamed to the terminal or as JSON lines."""
import json
import sys

from ..request import weights as checked_weights
from ._common import add_sampling_args, load_engine, parse_weights, read_prompts, sampling_options


def register(sub):
    g = sub.add_parser("generate", help="generate with weighted ARMs")
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} per line")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_args(g)
    g.set_defaults(func=run)


def run(args):
    prompts = read_prompts(args)
    weights = parse_weights(args.weight)
    engine = load_engine(args)
    options = sampling_options(args, engine.profile)
    weights = checked_weights(weights, engine, options.normalised, "--weight")
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
