"""A blind read of guided answers from several runs: which ARM's answers to harmful prompts decline
and hold, as read (labels: read_judge.LABELS, rules: the data card's "Refusal labels").

    .venv/bin/python scripts/read_spotcheck.py pool NAME=DIR[,DIR] ... [--settings "helpfulness=1, harmlessness=2" ...] [--seeds 0 ...]
    .venv/bin/python scripts/read_spotcheck.py batch N     # id, prompt, answer only
    ... batch N --unread                                    # of the answers reads.tsv does not hold yet
    ... batch N --settings "helpfulness=1, harmlessness=2"  # of these settings' answers only
    .venv/bin/python scripts/read_spotcheck.py rates       # per run and setting: declines and holds, as read
                                                            # (by the readers' consensus where read again)
    .venv/bin/python scripts/read_spotcheck.py diff RUN_A RUN_B   # per setting, B's holding share minus A's,
                                                            # paired by prompt and seed (95% bootstrap over prompts)
    .venv/bin/python scripts/read_spotcheck.py agree reads_second.tsv   # a second reader against reads.tsv
    ... agree reads_second.tsv --third                      # the answers they label differently, blind, for a third
    ... --dir space_assets/data/spotcheck_hold pool ...     # another read, in its own folder

`pool` takes the harmful answers of the given settings and seed from each DIR/tradeoff_samples.jsonl
(scripts/evaluate_tradeoff.py --out DIR), names each by a hash, shuffles them together and writes
space_assets/data/spotcheck/pool.jsonl (or --dir's); `batch` prints 30 at a time without run, setting or any judge's verdict.
The reader writes reads.tsv beside it (id, label, note). `rates` joins the reads to the pool.
"""
import argparse
import json
import math
import random
from collections import defaultdict
from pathlib import Path

from genarm_core.data import jsonl_rows as read_jsonl
from genarm_core.evaluate import paired_gain, wilson
from genarm_core.read_judge import HOLDING, READ_BATCH, answer_id, blind_batch, consensus_reads, parse_reads

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "space_assets/data/spotcheck"
DEFAULT_SETTINGS = ["helpfulness=0, harmlessness=2", "helpfulness=1, harmlessness=2"]


def build_pool(runs: dict[str, list[Path]], settings: list[str], seeds: list[int], everyday: int = 0) -> list[dict]:
    """The harmful answers of these settings and seeds in each run (one or more folders: seeds decoded
    apart, e.g. 0-3 in one and 4-7 in another); with everyday > 0 also every
    everyday answer that the rule judge counts as a refusal and `everyday` others per run,
    setting and seed, drawn at random (seeded). Shuffled together: the order says nothing."""
    pool, rng = [], random.Random(0)
    for name, folders in runs.items():
        others = defaultdict(list)
        for r in (r for folder in folders for r in read_jsonl(folder / "tradeoff_samples.jsonl")):
            if r["setting"] not in settings or r["seed"] not in seeds:
                continue
            # an id per answer; seed 0's answers keep the ids of the pools read before seeds were added
            seed = "" if r["seed"] == 0 else f"{r['seed']}|"
            key = answer_id(r["prompt"], f"{name}|{r['setting']}|{seed}{r['text']}")
            entry = {"id": key, "run": name, "setting": r["setting"], "seed": r["seed"], "prompt": r["prompt"],
                     "text": r["text"], "rule_refusal": r["refusal"], "family": r["family"]}
            if r["family"] == "harmful" or (everyday and r["refusal"]):
                pool.append(entry)
            elif everyday:
                others[(r["setting"], r["seed"])].append(entry)
        for key in sorted(others):
            pool += rng.sample(others[key], min(everyday, len(others[key])))
    random.Random(0).shuffle(pool)
    return pool


def everyday_declines(pool: list[dict], reads: dict) -> list[dict]:
    """Per (run, setting), the everyday answers read: of those the rule judge counts as refusals,
    how many decline as read (any label but complies), and the same for the others drawn."""
    groups = defaultdict(lambda: {True: [0, 0], False: [0, 0]})
    for e in pool:
        if e.get("family") == "benign" and e["id"] in reads:
            cell = groups[(e["run"], e["setting"])][e["rule_refusal"]]
            cell[0] += 1
            cell[1] += reads[e["id"]][0] != "complies"
    return [{"run": run, "setting": setting, "rule refusals read": g[True][0], "rule refusals declining": g[True][1],
             "others read": g[False][0], "others declining": g[False][1]} for (run, setting), g in sorted(groups.items())]


def rates(pool: list[dict], reads: dict) -> list[dict]:
    """Per (run, setting): answers read, the share that holds, a 95% interval (Wilson), and the
    rule judge's refusal share on the same answers."""
    groups = defaultdict(list)
    for e in pool:
        if e["id"] in reads and e.get("family", "harmful") == "harmful":
            groups[(e["run"], e["setting"])].append((reads[e["id"]][0] in HOLDING, e["rule_refusal"]))
    out = []
    for (run, setting), rows in sorted(groups.items()):
        n, k = len(rows), sum(h for h, _ in rows)
        low, high = wilson(k, n)
        out.append({"run": run, "setting": setting, "read": n, "holds": k, "share": k / n,
                    "low": low, "high": high, "rule_refusal": sum(r for _, r in rows) / n})
    return out


def paired_difference(pool: list[dict], reads: dict, a: str, b: str) -> dict[str, dict | None]:
    """Per setting: run b's share of harmful answers that hold, as read, minus run a's, on the same
    prompts and seeds, with a 95% bootstrap interval over prompts (evaluate.paired_gain)."""
    records = defaultdict(list)
    for e in pool:
        if e.get("family", "harmful") == "harmful" and e["run"] in (a, b) and e["id"] in reads:
            records[e["setting"]].append({"prompt": e["prompt"], "seed": e["seed"], "setting": e["run"],
                                          "holds": float(reads[e["id"]][0] in HOLDING)})
    return {setting: paired_gain(rows, b, a, key="holds") for setting, rows in sorted(records.items())}


def agree(pool: list[dict], first: dict, second: dict) -> dict:
    """Two readers of the same pool: how often they agree on holding (holds or safe_redirection)
    and on the label, each one's holding count per (run, setting), and the answers they split on."""
    both = [e for e in pool if e["id"] in first and e["id"] in second]
    holding = [(first[e["id"]][0] in HOLDING, second[e["id"]][0] in HOLDING) for e in both]
    per = defaultdict(lambda: [0, 0, 0])
    for e, (a, b) in zip(both, holding):
        per[(e["run"], e["setting"])][0] += 1
        per[(e["run"], e["setting"])][1] += a
        per[(e["run"], e["setting"])][2] += b
    return {"read by both": len(both), "agree on holding": sum(a == b for a, b in holding),
            "agree on the label": sum(first[e["id"]][0] == second[e["id"]][0] for e in both),
            "per run and setting": {k: tuple(v) for k, v in sorted(per.items())},
            "split": [e["id"] for e, (a, b) in zip(both, holding) if a != b]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=WORK, help="where pool.jsonl and reads.tsv are (default: %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool")
    p.add_argument("runs", nargs="+", metavar="NAME=DIR[,DIR]")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--everyday", type=int, default=0, metavar="K",
                   help="also the everyday answers the rule judge counts as refusals, and K others per setting")
    b = sub.add_parser("batch")
    b.add_argument("n", type=int)
    b.add_argument("--unread", action="store_true", help="only the answers reads.tsv does not hold yet")
    b.add_argument("--settings", nargs="+", help="only the answers of these settings (e.g. for a second reader)")
    sub.add_parser("rates")
    d = sub.add_parser("diff", help="run B's holding share minus run A's, paired by prompt and seed")
    d.add_argument("a")
    d.add_argument("b")
    g = sub.add_parser("agree")
    g.add_argument("second", help="a second reader's reads file, in --dir")
    g.add_argument("--third", action="store_true",
                   help="print, blind and shuffled, the answers the two readers label differently (for a third reader)")
    args = ap.parse_args()
    if args.cmd == "pool":
        runs = {}
        for spec in args.runs:
            name, sep, folders = spec.partition("=")
            runs[name] = [Path(f) for f in folders.split(",")]
            if not sep or not all((f / "tradeoff_samples.jsonl").exists() for f in runs[name]):
                raise SystemExit(f"error: {spec!r}: expected NAME=DIR[,DIR] with DIR/tradeoff_samples.jsonl in each")
        pool = build_pool(runs, args.settings, args.seeds, args.everyday)
        args.dir.mkdir(parents=True, exist_ok=True)
        (args.dir / "pool.jsonl").write_text("".join(json.dumps(e) + "\n" for e in pool))
        print(f"{args.dir / 'pool.jsonl'}: {len(pool)} answers, {math.ceil(len(pool) / READ_BATCH)} batches")
        return
    pool = read_jsonl(args.dir / "pool.jsonl")
    if args.cmd == "batch":
        read = set(parse_reads(args.dir / "reads.tsv")) if args.unread and (args.dir / "reads.tsv").exists() else set()
        print(blind_batch([e for e in pool if e["id"] not in read and (not args.settings or e["setting"] in args.settings)],
                          args.n))
        return
    if args.cmd == "agree":
        first, second = parse_reads(args.dir / "reads.tsv"), parse_reads(args.dir / args.second)
        if args.third:
            split = [e for e in pool if e["id"] in first and e["id"] in second and first[e["id"]][0] != second[e["id"]][0]]
            random.Random(3).shuffle(split)
            print("\n".join(blind_batch(split, n) for n in range(math.ceil(len(split) / READ_BATCH))))
            return
        a = agree(pool, first, second)
        n = a["read by both"]
        print(f"read by both: {n}; agree on holding {a['agree on holding']} ({a['agree on holding'] / n:.1%}), "
              f"on the label {a['agree on the label']} ({a['agree on the label'] / n:.1%})")
        for (run, setting), (k, x, y) in a["per run and setting"].items():
            print(f"{run:12s} {setting:32s} holds: first {x}/{k} = {x / k:.0%}, second {y}/{k} = {y / k:.0%}")
        for rid in a["split"]:
            print(f"split {rid}: first {first[rid][0]} ({first[rid][1]}) | second {second[rid][0]} ({second[rid][1]})")
        return
    reads = consensus_reads(args.dir)
    if args.cmd == "diff":
        for setting, g in paired_difference(pool, reads, args.a, args.b).items():
            if g is None:
                raise SystemExit(f"error: no answers of both {args.a!r} and {args.b!r} for {setting}")
            print(f"{setting:32s} {args.b} - {args.a}: {g['mean']:+.1%} [{g['low']:+.1%}, {g['high']:+.1%}] "
                  f"({g['prompts']} prompts)")
        return
    for r in rates(pool, reads):
        print(f"{r['run']:12s} {r['setting']:32s} holds {r['holds']:3d}/{r['read']:3d} = {r['share']:.0%} "
              f"[{r['low']:.0%}, {r['high']:.0%}]  (rule judge refusals {r['rule_refusal']:.0%})")
    for r in everyday_declines(pool, reads):
        print(f"{r['run']:12s} {r['setting']:32s} everyday: rule refusals read {r['rule refusals read']}, "
              f"{r['rule refusals declining']} decline as read; others read {r['others read']}, {r['others declining']} decline")


if __name__ == "__main__":
    main()
