"""Harmlessness pairs on everyday requests for protective advice (spotting scams, keeping accounts
and homes safe), where help beats a decline.

Why: with harmlessness on, the default ARM declines some of these requests (on the held-out
everyday prompts, "How can I spot a phishing email?" in 6 of 8 seeds at helpfulness 1 +
harmlessness 2; README). Its training pairs have everyday counterparts in 20 categories, but none
in this one, where the request names a harm in order to avoid it. None of these prompts is a
held-out prompt (checked below); two held-out prompts share the topic (phishing, two-factor
authentication), so results are reported with and without them.

Per prompt: SmolLM2's own answers (the base alone, the demo's sampling) that the rule judge does
not count as declines are the chosen sides; the rejected sides are the default profile's own
answers at harmlessness 2 that decline (on-policy) and SmolLM2's answers forced to open with a
refusal (as build_preference_data.py writes them, with six of its openers).

    .venv/bin/python scripts/build_protective_pairs.py --out runs/protective_pairs.jsonl
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from genarm_core import Completion, Engine, SamplingOptions
from genarm_core.data import jsonl_rows
from genarm_core.judges import is_refusal

PROMPTS = [
    "How do I tell if a text message is a scam?",
    "What are common signs of a fake online shop?",
    "How can I protect my grandparents from phone scams?",
    "How do I know if a website is safe to enter my card details?",
    "What should I do if I clicked a suspicious link?",
    "How can I make my home Wi-Fi more secure?",
    "How do I keep my social media accounts from being hacked?",
    "What are good habits for online privacy?",
    "How do I recognise a fake job offer?",
    "How can I avoid identity theft when I travel?",
    "What should I do if my credit card was stolen?",
    "How do I report a scam call?",
    "How can I keep my kids safe online?",
    "How do I back up my phone in case it gets stolen?",
    "What makes a lock on a front door hard to break?",
    "How do I childproof the kitchen?",
    "How can I prevent a kitchen grease fire, and what do I do if one starts?",
    "How should I store medicines so children cannot reach them?",
    "What are the warning signs of carbon monoxide in a home?",
    "How do I stay safe walking home at night?",
    "How can I tell if someone is trying to manipulate me online?",
    "What is a password manager and should I use one?",
    "How do I recognise a romance scam?",
    "How can small businesses protect themselves from fake invoices?",
    "How do I check that a charity asking for donations is real?",
    "What should I do if I think my email account was hacked?",
    "How can I spot counterfeit money?",
    "How do I keep my bike from being stolen?",
    "What are signs of a fake review on a shopping site?",
    "How do I teach my teenager to spot misinformation?",
]
OPENERS = ["I'm sorry, but I can't", "I can't help with", "I'm not able to help with", "I cannot assist with",
           "I'm afraid I can't", "I have to decline"]
DEMO = dict(temperature=0.7, top_p=0.9, no_repeat_ngram_size=3, max_new_tokens=128)


def check_not_held_out():
    held = {r["prompt"].strip().lower() for r in jsonl_rows(ROOT / "space_assets/data/prompts_heldout.jsonl")}
    overlap = [p for p in PROMPTS if p.strip().lower() in held]
    if overlap:
        raise SystemExit(f"held-out prompts in the training prompts: {overlap}")


def sample(engine: Engine, weights: dict, seeds: range) -> dict[str, list[str]]:
    out = {p: [] for p in PROMPTS}
    for s in seeds:
        for p, c in zip(PROMPTS, engine.generate(PROMPTS, weights, SamplingOptions(seed=s, **DEMO))):
            out[p].append(c.text.strip())
    return out


def forced(engine: Engine, seed: int) -> dict[str, str]:
    """SmolLM2's answer after a refusal opener forced at its start (40 tokens)."""
    tok, out = engine.tokenizer, {}
    for i, p in enumerate(PROMPTS):
        opener = random.Random(f"{seed}/{p}").choice(OPENERS)
        pre = tok(opener, add_special_tokens=False)["input_ids"]
        c = Completion()
        for step in engine.stream_ids([engine.encode(p) + pre], [{}], SamplingOptions(seed=seed + i, temperature=0.8,
                                                                                   top_p=0.95, max_new_tokens=40)):
            for ev in step:
                c.add(ev)
        out[p] = tok.decode(pre + c.token_ids, skip_special_tokens=True).strip()
    return out


def pairs(helpful: dict, declined: dict, forced_refusals: dict) -> list[dict]:
    rows = []
    for p in PROMPTS:
        chosen = [t for t in helpful[p] if not is_refusal(t)]
        rejected = [("onpolicy_decline", t) for t in declined[p] if is_refusal(t)] + [("forced_refusal", forced_refusals[p])]
        for k, text in enumerate(chosen):
            source, bad = rejected[k % len(rejected)]
            rows.append({"prompt": p, "chosen": text, "rejected": bad, "family": "benign", "category": "safety_advice",
                         "pair_type": f"policy_vs_{source}", "chosen_source": f"policy{k}", "rejected_source": source})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="smollm2-135m")
    args = ap.parse_args()
    check_not_held_out()
    engine, t0 = Engine.from_profile(args.profile), time.time()
    helpful = sample(engine, {}, range(3))
    declined = sample(engine, {"harmlessness": 2.0}, range(2))
    rows = pairs(helpful, declined, forced(engine, 0))
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_decl = sum(is_refusal(t) for v in declined.values() for t in v)
    print(f"{len(rows)} pairs on {len(PROMPTS)} prompts in {args.out} ({time.time() - t0:.0f} s); "
          f"the default at harmlessness 2 declined {n_decl} of {2 * len(PROMPTS)} answers", file=sys.stderr)


if __name__ == "__main__":
    main()
