"""Preference pairs at the demo's length, from SmolLM2's own answers of up to --max-new-tokens.

    .venv/bin/python scripts/build_long_pairs.py [--samples 4] [--max-new-tokens 160]   # helpfulness
    .venv/bin/python scripts/build_long_pairs.py --objective harmlessness               # refusals that hold

The ARMs first learned from answers of at most 64 tokens, and at 128 tokens helpfulness guidance
made answers loop (README). Here each everyday training prompt gets --samples plain answers
(temperature 0.8, top-p 0.95, no repetition rules, so that some loop as they do in the wild)
from the base; the best and the worst by the judge form a pair when they differ by at least
--min-gap (and the second best and the worst, when that gap holds too). A tenth of the prompts is
held out for the ARM's preference accuracy. Writes space_assets/data/helpfulness_long_{train,
heldout}.jsonl, and helpfulness_everyday_{train,heldout}.jsonl: those with the earlier pairs on
everyday prompts (what the helpfulness ARM trains on). Deterministic given --seed.
"""
import argparse
import json
import random
import time
from pathlib import Path

from genarm_core import Engine, SamplingOptions
from genarm_core.judges import score_batch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "space_assets" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--min-gap", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", choices=("helpfulness", "harmlessness"), default="helpfulness")
    args = ap.parse_args()
    prompts = [json.loads(line) for line in (OUT / "prompts_train.jsonl").read_text().splitlines() if line.strip()]
    engine = Engine.from_profile()
    if args.objective == "harmlessness":
        return refusals_that_hold(engine, [p for p in prompts if p["family"] == "harmful"], args)
    prompts = [p for p in prompts if p["family"] == "benign"]
    opts = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    start, answers = time.time(), []
    for k in range(args.samples):  # one request per round: all prompts batched by the scheduler
        results = engine.generate([p["prompt"] for p in prompts], {}, SamplingOptions(
            **{**opts.as_dict(), "seed": args.seed * 100 + k}))
        answers.append(results)
        print(f"  round {k + 1}/{args.samples}: {len(prompts)} answers ({time.time() - start:.0f} s)", flush=True)
    rng = random.Random(args.seed)
    held = set(rng.sample(range(len(prompts)), len(prompts) // 10))
    out = {"train": [], "heldout": []}
    for i, p in enumerate(prompts):
        texts = [a[i].text.strip() for a in answers]
        complete = [a[i].finish_reason == "eos" for a in answers]
        scores = [s["helpfulness"] for s in score_batch([p["prompt"]] * len(texts), texts, [False] * len(texts))]
        order = sorted(range(len(texts)), key=lambda j: -scores[j])
        worst = order[-1]
        for c in order[:2]:
            if c != worst and scores[c] - scores[worst] >= args.min_gap and texts[c] != texts[worst]:
                out["heldout" if i in held else "train"].append({
                    "prompt": p["prompt"], "chosen": texts[c], "rejected": texts[worst], "family": "benign",
                    "category": p.get("category", ""), "pair_type": "long_policy_vs_policy",
                    "chosen_score": scores[c], "rejected_score": scores[worst],
                    "chosen_complete": complete[c], "rejected_complete": complete[worst]})
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
    held = set(random.Random(args.seed).sample(range(len(prompts)), len(prompts) // 10))
    out = {"train": [], "heldout": []}
    for i, p in enumerate(prompts):
        cands = [r[i] for r in rounds]
        scores = [s["harmlessness"] for s in score_batch([p["prompt"]] * len(cands), [c for c, _ in cands],
                                                         [True] * len(cands))]
        best, worst = max(range(len(cands)), key=scores.__getitem__), min(range(len(cands)), key=scores.__getitem__)
        if scores[best] - scores[worst] >= 0.2:
            out["heldout" if i in held else "train"].append({
                "prompt": p["prompt"], "chosen": cands[best][0], "rejected": cands[worst][0], "family": "harmful",
                "category": p.get("category", ""), "pair_type": "long_refusal_held_vs_pivot",
                "chosen_score": scores[best], "rejected_score": scores[worst],
                "chosen_complete": cands[best][1], "rejected_complete": cands[worst][1]})
    for split, rows in out.items():
        write(OUT / f"harmlessness_long_{split}.jsonl", rows)
    write(OUT / "harmlessness_all_train.jsonl", read(OUT / "harmlessness_train.jsonl") + out["train"])
    write(OUT / "harmlessness_all_heldout.jsonl", read(OUT / "harmlessness_heldout_sample.jsonl") + out["heldout"])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
