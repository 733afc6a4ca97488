"""The harmlessness ARM's training pairs whose chosen side is the model's own refusal, read by hand.

    .venv/bin/python scripts/read_pairs.py batch N   # prints batch N: id, prompt, chosen answer only
    .venv/bin/python scripts/read_pairs.py summary   # per pair type: how many chosen answers hold, as read
    .venv/bin/python scripts/read_pairs.py apply     # -> harmlessness_read_{train,heldout}.jsonl

Four kinds of pair in harmlessness_all_train.jsonl were picked by the rule judge (judges.is_refusal)
with a model-written refusal as the chosen side (AUDITED below): a forced refusal opening that the
base continued, a long answer that "holds", and the first ARMs' own guided refusals. The rule judge
counts "I can't help with that, but I can tell you how..." as a refusal (README, "The refusal
judge, read by hand"), so some of these pairs prefer one pivot over another, and teach the pivot.
Their chosen answers were read (`pair_reads.tsv`: id, label, note; the labels and their rules are
read_judge.LABELS and the data card's "Refusal labels"). `apply` keeps a pair whose chosen answer
holds as read, and turns a pair whose chosen answer does not into a pair that prefers a written
refusal for the same prompt (one the data already holds, taken in turn) over that answer; a
prompt without a written refusal loses the pair. Every other pair is kept as it is.

The turned pairs show the ARM some 40 written refusals 155 times as the chosen side, and read on
held-out prompts, an ARM trained on them also wrote them on everyday requests ("I can't help with
that. If you're dealing with a difficult conversation..." to "How do I apologize sincerely?"). So
`apply` also adds one everyday pair per turned pair (`counterparts`): an answer the data already
prefers for an everyday prompt of the same split, over that same written refusal.
"""
import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from genarm_core.data import jsonl_rows as read_jsonl
from genarm_core.read_judge import HOLDING, answer_id, blind_batch, blind_order, parse_reads

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "space_assets/data"
READS = DATA / "pair_reads.tsv"
AUDITED = ("forced_vs_policy", "forced_vs_written", "long_refusal_held_vs_pivot", "onpolicy_refusal_vs_guided_pivot")
SPLITS = ("train", "heldout")


def audited(rows: list[dict]) -> list[dict]:
    """The chosen answers to read: one per distinct (prompt, answer), in read_judge.blind_order so
    that the order says nothing about the pair type."""
    return blind_order({"id": answer_id(r["prompt"], r["chosen"]), "prompt": r["prompt"], "text": r["chosen"]}
                       for r in rows if r["pair_type"] in AUDITED and r["family"] == "harmful")


def written_refusals(rows: list[dict]) -> dict[str, list[str]]:
    """prompt -> the written refusals the data holds for it (chosen sides of written_* pairs)."""
    out = defaultdict(list)
    for r in rows:
        if r["pair_type"].startswith("written_") and r["family"] == "harmful" and r["chosen"] not in out[r["prompt"]]:
            out[r["prompt"]].append(r["chosen"])
    return out


def apply(rows: list[dict], reads: dict) -> tuple[list[dict], Counter]:
    """rows with every audited pair kept (chosen holds as read), turned (a written refusal over the
    chosen answer) or dropped (no written refusal); raises when an audited answer is unread."""
    written, turn, out, counts = written_refusals(rows), Counter(), [], Counter()
    for r in rows:
        if r["pair_type"] not in AUDITED or r["family"] != "harmful":
            out.append(r)
            continue
        rid = answer_id(r["prompt"], r["chosen"])
        if rid not in reads:
            raise SystemExit(f"{READS}: no read for answer {rid} (pair type {r['pair_type']}); run `batch` and read it")
        if reads[rid][0] in HOLDING:
            out.append(r)
            counts["kept"] += 1
        elif written[r["prompt"]]:
            refusals = written[r["prompt"]]
            chosen = refusals[turn[r["prompt"]] % len(refusals)]
            turn[r["prompt"]] += 1
            out.append({**r, "chosen": chosen, "rejected": r["chosen"], "pair_type": "written_vs_read_pivot",
                        "chosen_score": None, "rejected_score": None, "chosen_complete": True,
                        "rejected_complete": r.get("chosen_complete")})
            counts["turned"] += 1
        else:
            counts["dropped"] += 1
    return out, counts


def counterparts(rows: list[dict], pair_types=("written_vs_read_pivot",), seed: int = 0) -> list[dict]:
    """One everyday pair per pair of pair_types in rows (the turned pairs): the chosen side of an
    everyday prompt's own answer-over-refusal pair, over the refusal the pair prefers. Prompts are
    taken in a fixed shuffled order, and each prompt's answers in turn."""
    answers = defaultdict(list)  # everyday prompt -> the answer-over-refusal pairs it has
    for r in rows:
        if r["family"] == "benign" and r["pair_type"] in ("policy_vs_forced", "policy_vs_written"):
            if r["chosen"] not in (a["chosen"] for a in answers[r["prompt"]]):
                answers[r["prompt"]].append(r)
    prompts = sorted(answers)
    random.Random(seed).shuffle(prompts)
    out = []
    for i, t in enumerate(r for r in rows if r["pair_type"] in pair_types):
        p = prompts[i % len(prompts)]
        a = answers[p][i // len(prompts) % len(answers[p])]
        out.append({**a, "rejected": t["chosen"], "pair_type": "policy_vs_turned_refusal",
                    "rejected_source": "written_refusal" if t["pair_type"] == "written_vs_read_pivot" else t["chosen_source"], "score_rejected": None, "rejected_complete": True})
    return out


def summary(rows: list[dict], reads: dict):
    by_type = defaultdict(Counter)
    for r in rows:
        if r["pair_type"] in AUDITED and r["family"] == "harmful":
            label = reads.get(answer_id(r["prompt"], r["chosen"]), ("unread",))[0]
            by_type[r["pair_type"]]["holds" if label in HOLDING else label] += 1
    for t, c in sorted(by_type.items()):
        n = sum(c.values())
        print(f"{t:34s} {n:4d} pairs: chosen holds {c['holds']} ({c['holds'] / n:.0%}), declines then complies "
              f"{c['declines_then_complies']}, complies {c['complies']}, unread {c['unread']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("batch").add_argument("n", type=int)
    sub.add_parser("summary")
    sub.add_parser("apply")
    args = ap.parse_args()
    reads = parse_reads(READS) if READS.exists() else {}
    if args.cmd == "batch":
        rows = [r for split in SPLITS for r in read_jsonl(DATA / f"harmlessness_all_{split}.jsonl")]
        print(blind_batch(audited(rows), args.n))
        return
    if args.cmd == "summary":
        for split in SPLITS:
            print(f"harmlessness_all_{split}.jsonl")
            summary(read_jsonl(DATA / f"harmlessness_all_{split}.jsonl"), reads)
        return
    for split in SPLITS:
        rows, counts = apply(read_jsonl(DATA / f"harmlessness_all_{split}.jsonl"), reads)
        extra = counterparts(rows)
        rows += extra
        path = DATA / f"harmlessness_read_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path.name}: {len(rows)} pairs; audited pairs kept {counts['kept']}, turned {counts['turned']}, "
              f"dropped {counts['dropped']}; {len(extra)} everyday counterparts")


if __name__ == "__main__":
    main()
