"""Answers read by hand for the refusal judge (space_assets/DATA_CARD.md, "Refusal labels").

    .venv/bin/python scripts/refusal_labels.py pool     # draws the answers to read (deterministic)
    .venv/bin/python scripts/refusal_labels.py batch N  # prints blind batch N: id, prompt, answer only
    .venv/bin/python scripts/refusal_labels.py join     # reads + pool -> refusal_labels.jsonl
    .venv/bin/python scripts/refusal_labels.py rates    # per setting: declines and holds, as read

`pool` draws a stratified sample of a trade-off run's samples (harmful answers with
harmlessness on and the rule judge saying refusal drawn most), adds the hand-read answers of
refusal_reads.jsonl that the trade-off samples do not hold (two other ARMs), removes duplicate
texts and shuffles, so that the pool's order says nothing about the setting. The reader sees only
`batch` output and writes one line per answer to refusal_label_reads.tsv: id, label, note.
`join` attaches each read to its answer's prompt, family, setting and seed.

The shipped pool was drawn from the trade-off samples of commit 8af406e (the first harmlessness
ARM's run; space_assets/tradeoff_samples.jsonl holds the default profile's run now). `pool` and
`rates` take them with --samples:

    git show 8af406e:space_assets/tradeoff_samples.jsonl > /tmp/first_arm_samples.jsonl
    .venv/bin/python scripts/refusal_labels.py pool --samples /tmp/first_arm_samples.jsonl   # the same 496
"""
import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from genarm_core.data import jsonl_rows as read_jsonl
from genarm_core.read_judge import HOLDING, LABELS, READ_BATCH, answer_id, blind_batch, parse_reads

DATA = ROOT / "space_assets/data"
OLD_READS = DATA / "refusal_reads.jsonl"
POOL = DATA / "refusal_label_pool.jsonl"
READS = DATA / "refusal_label_reads.tsv"
LABELS_OUT = DATA / "refusal_labels.jsonl"
SEED = 24

# (name, which records, how many to draw); "all" takes every record of the stratum
STRATA = [
    ("harmful, harmlessness on, rule refusal", lambda r: r["family"] == "harmful" and _guided_harmless(r) and r["refusal"], 190),
    ("harmful, harmlessness on, rule answer", lambda r: r["family"] == "harmful" and _guided_harmless(r) and not r["refusal"], 70),
    ("harmful, harmlessness off, rule refusal", lambda r: r["family"] == "harmful" and not _guided_harmless(r) and r["refusal"], "all"),
    ("harmful, harmlessness off, rule answer", lambda r: r["family"] == "harmful" and not _guided_harmless(r) and not r["refusal"], 40),
    ("benign, rule refusal", lambda r: r["family"] == "benign" and r["refusal"], "all"),
    ("benign, rule answer", lambda r: r["family"] == "benign" and not r["refusal"], 60),
]


def _guided_harmless(record: dict) -> bool:
    return not record.get("baseline") and record["weights"].get("harmlessness", 0) > 0


def draw_evenly(rows: list[dict], n, rng: random.Random, must: set) -> list[dict]:
    """n rows spread evenly over settings (round robin over shuffled per-setting lists); rows whose
    id is in `must` (answers read before) come first."""
    if n == "all" or n >= len(rows):
        return rows
    by_setting: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (answer_id(r["prompt"], r["text"]) not in must, rng.random())):
        by_setting.setdefault(r["setting"], []).append(r)
    picked, queues = [], list(by_setting.values())
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def tradeoff_entry(r: dict, stratum: str) -> dict:
    return {"prompt": r["prompt"], "family": r["family"], "category": r.get("category", ""),
            "setting": r["setting"], "seed": r["seed"], "source": "tradeoff_samples", "arm": "shipped",
            "stratum": stratum, "text": r["text"], "rule_refusal": r["refusal"]}


def old_read_entry(r: dict) -> dict:
    return {"prompt": r["prompt"], "family": "harmful", "category": "", "setting": r["setting"],
            "seed": r["seed"], "source": "refusal_reads", "arm": r["harmlessness_arm"],
            "stratum": "earlier read, another ARM", "text": r["text"], "rule_refusal": r["judge_refusal"],
            "earlier_read": r["read"]}


def build_pool(samples: Path) -> list[dict]:
    rng = random.Random(SEED)
    records = read_jsonl(samples)
    old = read_jsonl(OLD_READS)
    old_by_id = {answer_id(o["prompt"], o["text"]): o for o in old}
    pool, seen = [], set()
    for name, keep, n in STRATA:
        rows = [r for r in records if keep(r)]
        for r in draw_evenly(rows, n, rng, set(old_by_id)):
            entry = tradeoff_entry(r, name)
            earlier = old_by_id.get(answer_id(r["prompt"], r["text"]))
            if earlier and earlier["harmlessness_arm"] == "shipped":
                entry["earlier_read"] = earlier["read"]
            pool.append(entry)
    known = {(r["prompt"], r["text"]) for r in records}
    pool += [old_read_entry(o) for o in old if (o["prompt"], o["text"]) not in known]
    unique = []
    for e in pool:
        e["id"] = answer_id(e["prompt"], e["text"])
        if e["id"] not in seen:
            seen.add(e["id"])
            unique.append(e)
    rng.shuffle(unique)
    return unique


def join(pool: list[dict], reads: dict) -> list[dict]:
    out = []
    for e in sorted(pool, key=lambda e: e["id"]):
        if e["id"] in reads:
            label, note = reads[e["id"]]
            out.append({k: v for k, v in e.items() if k != "stratum"} | {"label": label, "note": note})
    return out


def read_rate(samples: list[dict], labelled: list[dict], setting: str, family: str, positive) -> dict:
    """The share of a setting's answers (of one family) whose read label is `positive`, estimated
    from the read ones: per rule-judge verdict, the read share weighted by the verdict's share of
    all the setting's answers (the pool draws within each verdict at random). NaN when a verdict
    that occurs has no read answer."""
    rows = [r for r in samples if r["setting"] == setting and r["family"] == family]
    rate, var, read = 0.0, 0.0, 0
    for verdict in (True, False):
        weight = sum(r["refusal"] == verdict for r in rows) / len(rows)
        reads = [e for e in labelled if e["setting"] == setting and e["family"] == family
                 and e["source"] == "tradeoff_samples" and e["rule_refusal"] == verdict]
        if weight and not reads:
            return {"rate": float("nan"), "ci95": float("nan"), "read": read}
        if reads:
            p = sum(positive(e["label"]) for e in reads) / len(reads)
            rate, var, read = rate + weight * p, var + weight ** 2 * p * (1 - p) / len(reads), read + len(reads)
    return {"rate": rate, "ci95": 1.96 * var ** 0.5, "read": read,
            "rule": sum(r["refusal"] for r in rows) / len(rows)}


def print_rates(path: Path):
    samples, labelled = read_jsonl(path), read_jsonl(LABELS_OUT)
    print("| setting | refusals (harmful), rule judge | declines and holds, as read | answers read |\n|---|---|---|---|")
    for setting in dict.fromkeys(r["setting"] for r in samples):
        m = read_rate(samples, labelled, setting, "harmful", lambda label: label in HOLDING)
        if m["rate"] == m["rate"]:
            print(f"| {setting} | {m['rule']:.0%} | {m['rate']:.0%} ± {100 * m['ci95']:.0f} | {m['read']} |")
        else:
            print(f"| {setting} | - | too few read | {m['read']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("pool", "rates"):
        sub.add_parser(name).add_argument("--samples", type=Path, required=True,
                                          help="the trade-off run's samples the pool is drawn from (see above)")
    sub.add_parser("batch").add_argument("n", type=int)
    sub.add_parser("join")
    args = ap.parse_args()
    if args.cmd == "pool":
        pool = build_pool(args.samples)
        if POOL.exists() and [e["id"] for e in read_jsonl(POOL)] != [e["id"] for e in pool]:
            raise SystemExit(f"{args.samples} gives another pool than the shipped {POOL}, whose reads are "
                             "keyed by its answers; remove it first to draw a new one")
        POOL.write_text("".join(json.dumps(e) + "\n" for e in pool))
        print(f"{len(pool)} answers in {POOL} ({-(-len(pool) // READ_BATCH)} batches of {READ_BATCH})")
    elif args.cmd == "batch":
        print(blind_batch(read_jsonl(POOL), args.n))
    elif args.cmd == "rates":
        print_rates(args.samples)
    else:
        labelled = join(read_jsonl(POOL), parse_reads(READS))
        LABELS_OUT.write_text("".join(json.dumps(e) + "\n" for e in labelled))
        print(f"{len(labelled)} labelled answers in {LABELS_OUT}")


if __name__ == "__main__":
    main()
