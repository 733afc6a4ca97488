"""Preference pairs at the demo's length, from SmolLM2's own answers of up to --max-new-tokens.

    .venv/bin/python scripts/build_long_pairs.py [--samples 4] [--max-new-tokens 160]   # helpfulness
    .venv/bin/python scripts/build_long_pairs.py --objective harmlessness               # refusals that hold
    .venv/bin/python scripts/build_long_pairs.py --objective harmlessness-on-policy     # under guidance

The ARMs first learned from answers of at most 64 tokens, and at 128 tokens helpfulness guidance
made answers loop (README). Here each everyday training prompt gets --samples plain answers
(temperature 0.8, top-p 0.95, no repetition rules, so that some loop as they do in the wild)
from the base; the best and the worst by the judge form a pair when they differ by at least
--min-gap (and the second best and the worst, when that gap holds too). A tenth of the prompts is
held out for the ARM's preference accuracy. Writes space_assets/data/helpfulness_long_{train,
heldout}.jsonl, and helpfulness_everyday_{train,heldout}.jsonl: those with the earlier pairs on
everyday prompts (what the helpfulness ARM trains on). Deterministic given --seed.
--objective harmlessness-on-policy samples the shipped ARMs' own guided answers (see
guided_pivots); it needs trained ARMs, so it runs after a first scripts/train_demo_arms.sh.
"""
import argparse
import itertools
import json
import random
import time
from pathlib import Path

from genarm_core import Engine, SamplingOptions
from genarm_core.judges import declines_at_once, score_batch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "space_assets" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--min-gap", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", choices=("helpfulness", "harmlessness", "harmlessness-on-policy"),
                    default="helpfulness")
    ap.add_argument("--round", type=int, default=1,
                    help="harmlessness-on-policy: which round (2: under the ARM retrained on round 1's pairs)")
    args = ap.parse_args()
    prompts = [json.loads(line) for line in (OUT / "prompts_train.jsonl").read_text().splitlines() if line.strip()]
    engine = Engine.from_profile()
    if args.objective == "harmlessness":
        return refusals_that_hold(engine, [p for p in prompts if p["family"] == "harmful"], args)
    if args.objective == "harmlessness-on-policy":
        return guided_pivots(engine, [p for p in prompts if p["family"] == "harmful"], args)
    prompts = [p for p in prompts if p["family"] == "benign"]
    opts = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    start, answers = time.time(), []
    for k in range(args.samples):  # one request per round: all prompts batched by the scheduler
        results = engine.generate([p["prompt"] for p in prompts], {}, SamplingOptions(
            **{**opts.as_dict(), "seed": args.seed * 100 + k}))
        answers.append(results)
        print(f"  round {k + 1}/{args.samples}: {len(prompts)} answers ({time.time() - start:.0f} s)", flush=True)
    held = held_out(len(prompts), args.seed)
    out = {"train": [], "heldout": []}
    for i, p in enumerate(prompts):
        texts = [a[i].text.strip() for a in answers]
        complete = [a[i].finish_reason == "eos" for a in answers]
        scores = [s["helpfulness"] for s in score_batch([p["prompt"]] * len(texts), texts, [False] * len(texts))]
        order = sorted(range(len(texts)), key=lambda j: -scores[j])
        worst = order[-1]
        for c in order[:2]:
            if c != worst and scores[c] - scores[worst] >= args.min_gap and texts[c] != texts[worst]:
                out["heldout" if i in held else "train"].append(pair(
                    p, "benign", "long_policy_vs_policy", (scores[c], texts[c], complete[c]),
                    (scores[worst], texts[worst], complete[worst])))
    for split, rows in out.items():
        write(OUT / f"helpfulness_long_{split}.jsonl", rows)
    # the helpfulness ARM's data: everyday prompts only (harmful ones are the harmlessness ARM's
    # business: answer-vs-non-answer pairs there taught it to favour complying), short and long
    old = {split: [r for r in read(OUT / f"helpfulness_{name}.jsonl") if r["family"] == "benign"]
           for split, name in (("train", "train"), ("heldout", "heldout_sample"))}
    for split in ("train", "heldout"):
        write(OUT / f"helpfulness_everyday_{split}.jsonl", old[split] + out[split])


def refusals_that_hold(engine, prompts: list[dict], args):
    """Harmlessness pairs at length: on each harmful training prompt, --samples continuations of a
    forced refusal opener ("I'm sorry, but I can't", ...) of up to --max-new-tokens tokens. Small
    models often decline, then comply ("However, here is how..."); the continuation the judge
    finds most harmless is chosen over the one it finds least (when they differ by 0.2), so the
    ARM learns to keep declining through a long answer."""
    from build_preference_data import REFUSAL_OPENERS  # a script beside this one (on sys.path)

    tok = engine.tokenizer
    openers = [random.Random(f"{args.seed}/{p['prompt']}").choice(REFUSAL_OPENERS) for p in prompts]
    ids = [engine.encode(p["prompt"]) + tok(o, add_special_tokens=False)["input_ids"] for p, o in zip(prompts, openers)]
    start, rounds = time.time(), []
    for k in range(args.samples):
        opts = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=args.seed * 100 + k)
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        for step in engine.stream_ids(ids, [{}], opts):
            for ev in step:
                texts[ev.prompt] += ev.text
                done[ev.prompt] = ev.finish_reason == "eos" or done[ev.prompt]
        rounds.append([(f"{o}{t}".strip(), d) for o, t, d in zip(openers, texts, done)])
        print(f"  round {k + 1}/{args.samples}: {len(prompts)} refusals continued ({time.time() - start:.0f} s)", flush=True)
    held = held_out(len(prompts), args.seed)
    out = {"train": [], "heldout": []}
    for i, p in enumerate(prompts):
        cands = [r[i] for r in rounds]
        scores = [s["harmlessness"] for s in score_batch([p["prompt"]] * len(cands), [c for c, _ in cands],
                                                         [True] * len(cands))]
        best, worst = max(range(len(cands)), key=scores.__getitem__), min(range(len(cands)), key=scores.__getitem__)
        if scores[best] - scores[worst] >= 0.2:
            out["heldout" if i in held else "train"].append(pair(
                p, "harmful", "long_refusal_held_vs_pivot", (scores[best], *cands[best]),
                (scores[worst], *cands[worst])))
    for split, rows in out.items():
        write(OUT / f"harmlessness_long_{split}.jsonl", rows)
    write_harmlessness_all()


# the guided settings whose answers are sampled (helpfulness overruling harmlessness), and the
# one that declines most (a source of refusals that hold, for prompts where the others never do)
PIVOTING = ({"helpfulness": 1.0, "harmlessness": 2.0}, {"helpfulness": 2.0, "harmlessness": 2.0})
DECLINING = {"helpfulness": 0.0, "harmlessness": 2.0}


def guided_pivots(engine, prompts: list[dict], args):
    """On-policy harmlessness pairs: the shipped ARMs' own answers under guidance, at the demo's
    sampling (temperature 0.7, top-p 0.9, no-repeat 3-grams, 128 tokens). With helpfulness on,
    guided answers to harmful prompts often start to decline and turn ("I can't help" -> " but
    think about..." is the base's idiom, and the helpfulness ARM keeps it), which no off-policy
    pair shows the ARM. On each harmful training prompt, --samples rounds of the PIVOTING and
    DECLINING panes; the most harmless answer the judge counts as a refusal is chosen over each
    pivoting pane's least harmless compliance (gap >= 0.2), at most one pair per pane and prompt;
    a prompt whose chosen answer does not decline in its first sentence gives no pair.
    --round 2 (and on) samples anew (other seeds) under the ARM retrained with the earlier rounds'
    pairs, whose guided answers turn elsewhere, and writes its own files beside them."""
    if args.round < 1:
        raise SystemExit(f"error: --round: expected an integer >= 1, got {args.round}")
    panes = [DECLINING, *PIVOTING]
    start, rounds = time.time(), []
    for k in range(args.samples):
        opts = SamplingOptions(temperature=0.7, top_p=0.9, no_repeat_ngram_size=3, max_new_tokens=128,
                               seed=args.seed * 100 + 50 + 10 * (args.round - 1) + k)
        rounds.append(engine.generate([p["prompt"] for p in prompts], panes, opts))
        print(f"  round {k + 1}/{args.samples}: {len(prompts)} prompts x {len(panes)} panes "
              f"({time.time() - start:.0f} s)", flush=True)
    held = held_out(len(prompts), args.seed)  # the prompts refusals_that_hold holds out
    out = {"train": [], "heldout": []}
    for i, p in enumerate(prompts):
        cands = [(j, c.text.strip(), c.finish_reason == "eos") for r in rounds for j, c in enumerate(r[i])]
        judged = score_batch([p["prompt"]] * len(cands), [t for _, t, _ in cands], [True] * len(cands))
        refusals = [(s["harmlessness"], t, d) for (_, t, d), s in zip(cands, judged) if s["refusal"]]
        if not refusals:
            continue
        chosen = max(refusals)
        if not declines_at_once(chosen[1]):  # a refusal phrase in the opening, but not at once
            continue
        for pane in range(1, len(panes)):
            pivots = [(s["harmlessness"], t, d) for (j, t, d), s in zip(cands, judged)
                      if j == pane and not s["refusal"]]
            rejected = min(pivots, default=None)
            if rejected is not None and chosen[0] - rejected[0] >= 0.2:
                out["heldout" if i in held else "train"].append(pair(
                    p, "harmful", "onpolicy_refusal_vs_guided_pivot", chosen, rejected))
    for split, rows in out.items():
        write(onpolicy_file(args.round, split), rows)
    write_harmlessness_all()


def onpolicy_file(round_: int, split: str) -> Path:
    return OUT / (f"harmlessness_onpolicy_{split}.jsonl" if round_ == 1 else
                  f"harmlessness_onpolicy_r{round_}_{split}.jsonl")


def write_harmlessness_all():
    """harmlessness_all_{train,heldout}.jsonl (what the harmlessness ARM trains on): the short
    pairs, the long refusals that hold and, once built, the on-policy pairs of each round."""
    for split, short in (("train", "harmlessness_train"), ("heldout", "harmlessness_heldout_sample")):
        parts = [OUT / f"{short}.jsonl", OUT / f"harmlessness_long_{split}.jsonl"]
        parts += itertools.takewhile(Path.exists, (onpolicy_file(k, split) for k in itertools.count(1)))
        write(OUT / f"harmlessness_all_{split}.jsonl", [r for f in parts if f.exists() for r in read(f)])


def held_out(n: int, seed: int) -> set[int]:
    """The indices of a seeded tenth of n prompts, held out for the ARM's preference accuracy."""
    return set(random.Random(seed).sample(range(n), n // 10))


def pair(prompt: dict, family: str, pair_type: str, chosen: tuple, rejected: tuple) -> dict:
    """One preference pair; chosen and rejected are (judge score, text, ended with EOS)."""
    return {"prompt": prompt["prompt"], "chosen": chosen[1], "rejected": rejected[1], "family": family,
            "category": prompt.get("category", ""), "pair_type": pair_type,
            "chosen_score": chosen[0], "rejected_score": rejected[0],
            "chosen_complete": chosen[2], "rejected_complete": rejected[2]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
