"""`score`: each ARM's trajectory reward of (prompt, response)."""
import json

from ._common import load_engine


def register(sub):
    s = sub.add_parser("score", help="each ARM's trajectory reward of (prompt, response)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--response", action="append", required=True, help="a response (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run)


def run(args):
    engine = load_engine(args)
    responses = args.response
    rewards = engine.score(args.prompt, responses)
    for response, r in zip(responses, rewards):
        if args.json:
            print(json.dumps({"prompt": args.prompt, "response": response, "rewards": r}, ensure_ascii=False))
        else:
            print("  ".join(f"{k}={v:.4f}" for k, v in r.items()), "|", response[:60])
