"""On-policy harmlessness pairs picked by reading, for helpfulness 1 + harmlessness 2.

    .venv/bin/python scripts/build_read_onpolicy.py [--round 1] sample [--rounds 3]   # -> space_assets/data/onpolicy_read/pool.jsonl
    .venv/bin/python scripts/build_read_onpolicy.py [--round 1] batch N               # 30 answers, blind: id, prompt, answer
    .venv/bin/python scripts/build_read_onpolicy.py [--round 1] apply                 # -> harmlessness_read2_{train,heldout}.jsonl

Read blind over the trade-off run's 4 seeds, the read-pairs profile (smollm2-135m-read-pairs, the
default before these rounds) holds on 93% of held-out harmful requests at harmlessness 2 and on 58%
with helpfulness 1 as well: its answers decline and then comply (README). No judge reads that well
enough to pick pairs (the learned one: precision 0.84), so here a person reads them. `sample`
draws the read-pairs profile's own answers to the harmful
training prompts at the two panes PANES, at the demo's sampling, --rounds times (seeds 700 + k).
The reader labels each distinct answer in reads.tsv beside them (id, label, note; labels and
rules: read_judge.LABELS and the data card's "Refusal labels"). `apply` pairs, per prompt, an
answer that holds as read (one that "holds" before a safe redirection; the helpfulness-on pane's
before the other; taken in turn) over each answer that does not; a prompt none of whose answers
holds takes a written refusal the data holds for it instead (read_pairs.written_refusals). Each
such pair gets an everyday counterpart (read_pairs.counterparts): an everyday answer over the same
refusal, so that the ARM does not learn to decline everywhere. A tenth of the prompts is held
out (the tenth build_long_pairs holds out). Writes harmlessness_read2_{split}.jsonl:
harmlessness_read_{split}.jsonl with these pairs and their counterparts.

--round 2 does it again one step on (ROUNDS): it samples the profile trained on round 1's pairs
(smollm2-135m-read-onpolicy), at seeds 710 + k, into onpolicy_read2/, and adds its read pairs to
harmlessness_read2's, into harmlessness_read3_{split}.jsonl: the default profile's harmlessness ARM.
"""
import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from genarm_core.data import jsonl_rows as read_jsonl
from genarm_core.read_judge import HOLDING, answer_id, blind_batch, blind_order, parse_reads
from build_long_pairs import held_out, pair, write  # scripts beside this one (on sys.path when run;
from read_pairs import counterparts, written_refusals  # in tests, by pyproject's pythonpath)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "space_assets/data"
PANES = ({"helpfulness": 1.0, "harmlessness": 2.0}, {"helpfulness": 0.0, "harmlessness": 2.0})


@dataclass(frozen=True)
class Round:
    profile: str         # the profile whose answers are read
    work: str            # folder under DATA: pool.jsonl (the answers) and reads.tsv (their reads)
    seed: int            # sampling seeds seed, seed + 1, ...: none the other pair builders or the trade-off run use
    base: str            # the pairs these are added to: DATA/{base}_{split}.jsonl
    out: str             # -> DATA/{out}_{split}.jsonl


ROUNDS = {1: Round("smollm2-135m-read-pairs", "onpolicy_read", 700, "harmlessness_read", "harmlessness_read2"),
          2: Round("smollm2-135m-read-onpolicy", "onpolicy_read2", 710, "harmlessness_read2", "harmlessness_read3")}


def harmful_prompts() -> list[dict]:
    return [p for p in read_jsonl(DATA / "prompts_train.jsonl") if p["family"] == "harmful"]


def sample(rnd: Round, rounds: int):
    from genarm_core import Engine

    engine, prompts, rows, start = Engine.from_profile(rnd.profile), harmful_prompts(), [], time.time()
    for k in range(rounds):
        opts = replace(engine.profile.defaults, seed=rnd.seed + k)  # the demo's sampling: T 0.7, top-p 0.9, no-repeat 3, 128 tokens
        for p, answers in zip(prompts, engine.generate([p["prompt"] for p in prompts], list(PANES), opts)):
            for pane, c in enumerate(answers):
                text = c.text.strip()
                rows.append({"id": answer_id(p["prompt"], text), "prompt": p["prompt"], "category": p.get("category", ""),
                             "pane": pane, "seed": rnd.seed + k, "text": text, "complete": c.finish_reason == "eos"})
        print(f"  round {k + 1}/{rounds}: {len(prompts)} prompts x {len(PANES)} panes ({time.time() - start:.0f} s)",
              flush=True)
    work = DATA / rnd.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "pool.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {work / 'pool.jsonl'}: {len(rows)} answers, {len({r['id'] for r in rows})} distinct")


def read_pairs(rows: list[dict], reads: dict, written: dict[str, list[str]]) -> tuple[list[dict], Counter]:
    """The pairs of one split's answers (see the module docstring); raises when an answer is unread."""
    by_prompt, counts, out = defaultdict(list), Counter(), []
    for r in rows:
        if r["id"] not in reads:
            raise SystemExit(f"no read for answer {r['id']}; run `batch` and read it into reads.tsv")
        by_prompt[r["prompt"]].append(r)
    for prompt, answers in by_prompt.items():
        label = {r["id"]: reads[r["id"]][0] for r in answers}
        holding = sorted({r["id"]: r for r in answers if label[r["id"]] in HOLDING}.values(),
                         key=lambda r: (label[r["id"]] != "holds", r["pane"] != 0, r["seed"]))
        chosen = [(r["text"], r["complete"], "onpolicy_read_held") for r in holding]
        chosen = chosen or [(t, True, "written_refusal") for t in written.get(prompt, [])]
        turning = [r for r in answers if label[r["id"]] not in HOLDING]
        if turning and not chosen:
            counts["prompts without a refusal"] += 1
        for i, r in enumerate(turning if chosen else []):
            text, complete, source = chosen[i % len(chosen)]
            p = {"prompt": prompt, "category": r["category"]}
            out.append({**pair(p, "harmful", "refusal_vs_read_pivot", (None, text, complete),
                               (None, r["text"], r["complete"])),
                        "chosen_source": source, "rejected_source": f"pane{r['pane']}/{label[r['id']]}"})
            counts[f"chosen {source}"] += 1
    return out, counts


def split_pairs(rnd: Round, rows: list[dict], reads: dict, split: str) -> tuple[list[dict], list[dict], Counter]:
    """{rnd.out}_{split}'s rows ({rnd.base}'s, the read pairs of this split's prompts, their everyday
    counterparts), the read pairs alone and their counts."""
    prompts = [p["prompt"] for p in harmful_prompts()]
    held = {prompts[i] for i in held_out(len(prompts), 0)}
    base = read_jsonl(DATA / f"{rnd.base}_{split}.jsonl")
    new, counts = read_pairs([r for r in rows if (r["prompt"] in held) == (split == "heldout")], reads,
                             written_refusals(base))
    # the counterparts of all read pairs, in order; those of base's own read pairs (round 2 on) are in base
    extra = counterparts(base + new, pair_types=("refusal_vs_read_pivot",), seed=1)[-len(new):] if new else []
    return base + new + extra, new, counts


def apply(rnd: Round):
    rows, reads = read_jsonl(DATA / rnd.work / "pool.jsonl"), parse_reads(DATA / rnd.work / "reads.tsv")
    for split in ("train", "heldout"):
        out, new, counts = split_pairs(rnd, rows, reads, split)
        write(DATA / f"{rnd.out}_{split}.jsonl", out)
        print(f"  {split}: {len(new)} read pairs ({dict(counts)}), {len(new)} everyday counterparts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round", type=int, choices=sorted(ROUNDS), default=1, help="which round (ROUNDS)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sample").add_argument("--rounds", type=int, default=3)
    sub.add_parser("batch").add_argument("n", type=int)
    sub.add_parser("apply")
    args = ap.parse_args()
    rnd = ROUNDS[args.round]
    if args.cmd == "sample":
        if args.rounds < 1:
            raise SystemExit(f"error: --rounds: expected an integer >= 1, got {args.rounds}")
        return sample(rnd, args.rounds)
    if args.cmd == "batch":
        return print(blind_batch(blind_order(read_jsonl(DATA / rnd.work / "pool.jsonl")), args.n))
    apply(rnd)


if __name__ == "__main__":
    main()
