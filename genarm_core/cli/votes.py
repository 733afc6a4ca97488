"""`votes`: the demo visitors' votes, counted or exported as preference pairs for `train`."""
from ..votes import OBJECTIVES, VoteStore, default_path


def register(sub):
    v = sub.add_parser("votes", help="the demo's votes: count them, or export them as preference pairs")
    v.add_argument("--db", help=f"the votes database (default: $GENARM_VOTES or {default_path()})")
    actions = v.add_subparsers(dest="action", required=True)
    actions.add_parser("count", help="votes per objective and verdict").set_defaults(func=count)
    e = actions.add_parser("export", help="decided votes (A or B) as JSONL pairs: prompt, chosen, rejected")
    e.add_argument("--objective", required=True, choices=OBJECTIVES)
    e.add_argument("--out", required=True, help="JSONL file to write (the layout `train --data` reads)")
    e.set_defaults(func=export)


def count(args):
    rows = VoteStore(args.db).rows()
    tally = {}
    for r in rows:
        tally.setdefault(r["objective"], {}).setdefault(r["verdict"], 0)
        tally[r["objective"]][r["verdict"]] += 1
    print(f"{len(rows)} votes")
    for objective, verdicts in sorted(tally.items()):
        print(f"  {objective}: " + ", ".join(f"{k} {n}" for k, n in sorted(verdicts.items())))


def export(args):
    result = VoteStore(args.db).export(args.objective, args.out)
    print(f"wrote {result['path']}: {result['pairs']} pairs from {result['votes']} {args.objective} votes "
          f"({result['undecided']} ties or both bad left out)")
