"""Measures the helpfulness / harmlessness trade-off of the default profile's ARMs on the
held-out prompts; writes space_assets/tradeoff.json, tradeoff.png and prints a table.

    .venv/bin/python scripts/evaluate_tradeoff.py [--values 0 2 4] [--seeds 0 1] [--limit N]
        [--grid harmlessness=0,2,4]   # another grid for one ARM
    .venv/bin/python scripts/evaluate_tradeoff.py --rejudge   # re-judge the saved answers only
    ... --rejudge --read-judge         # + the read judge's label per answer (SmolLM2 reads each, ~45 min)
    ... --baselines                    # + the base under helpful-and-harmless / harmless system prompts
    ... --dpo runs/dpo-merged          # + a DPO policy (scripts/train_dpo_baseline.sh), decoded alone
    ... --only-baselines --merge-into space_assets   # add baseline rows to saved results
    ... --seeds 2 3 --merge-into space_assets        # add seeds (same prompts and options)
    ... --rejudge --out runs/x --merge-into space_assets   # add a run saved in runs/x to space_assets
    ... --rejudge --hand-reads space_assets/data/spotcheck_grid   # + a blind read's labels (read_spotcheck.py)
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dataclasses import replace  # noqa: E402

from genarm_core import Engine, SamplingOptions, load_models  # noqa: E402
from genarm_core.config import ModelSource  # noqa: E402
from genarm_core.data import jsonl_records, jsonl_rows  # noqa: E402
from genarm_core.evaluate import (BASELINES, attach_hand_reads, decoded_grid, judge_records, markdown_table, merge_records,  # noqa: E402
                                  plot, read_judge_records, read_prompts, run_grid, summarise, weight_grid)
from genarm_core.read_judge import consensus_reads  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile")
    ap.add_argument("--prompts", default=str(ROOT / "space_assets/data/prompts_heldout.jsonl"))
    ap.add_argument("--values", type=float, nargs="+", default=[0.0, 2.0, 4.0], help="weights per ARM (grid)")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                    help="this ARM's grid instead of --values (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--limit", type=int, help="at most this many prompts per family")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--normalised", action="store_true", help="divide the fused score by 1 + the sum of the weights")
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "space_assets"))
    ap.add_argument("--rejudge", action="store_true",
                    help="no decoding: re-judge the answers saved in --out (after a change to the judges)")
    ap.add_argument("--read-judge", action="store_true",
                    help="also label every answer with the read judge (genarm_core/read_judge.py): adds the "
                         "columns holds (harmful) and declines (benign); its features are cached in runs/")
    ap.add_argument("--hand-reads", action="append", default=[], metavar="DIR",
                    help="label the answers read by hand in DIR (pool.jsonl and reads.tsv of scripts/read_spotcheck.py; "
                         "read again by a second and third reader: their consensus, read_judge.consensus_reads): "
                         "adds the column declines and holds (harmful), read by hand (repeatable)")
    ap.add_argument("--baselines", action="store_true",
                    help="also decode the base under a helpful-and-harmless and a harmless system prompt")
    ap.add_argument("--dpo", metavar="FOLDER", help="also decode this DPO policy (a merged model folder) alone")
    ap.add_argument("--only-baselines", action="store_true", help="skip the weight grid")
    ap.add_argument("--merge-into", metavar="DIR",
                    help="add the new records to the results saved in DIR (same prompts and options); "
                         "a (setting, seed) decoded again replaces the saved one. With --rejudge: the "
                         "answers saved in --out join DIR's, and the result is written to DIR")
    args = ap.parse_args()
    out = Path(args.out)
    if args.rejudge:
        if not (out / "tradeoff_samples.jsonl").exists():
            sys.exit(f"error: --rejudge: no {out / 'tradeoff_samples.jsonl'}; run the evaluation first")
        meta = json.loads((out / "tradeoff.json").read_text())["meta"]
        records = judge_records([r for _, r in jsonl_records(out / "tradeoff_samples.jsonl", "trade-off answers")])
        if args.merge_into:  # --out's answers join DIR's saved ones, and the whole goes to DIR
            out, meta, records = Path(args.merge_into), *merged(Path(args.merge_into), meta, records)
        if args.read_judge:
            records = read_judge_records(records, ROOT / "runs/read_judge_tradeoff_features.pt")
        for folder in map(Path, args.hand_reads):
            records = attach_hand_reads(records, jsonl_rows(folder / "pool.jsonl"), consensus_reads(folder))
        return write_results(out, meta, records)

    engine = Engine.from_profile(args.profile)
    if not engine.arm_names:
        sys.exit("error: the profile has no ARMs to evaluate")
    prompts = read_prompts(args.prompts)
    if args.limit:
        prompts = [p for fam in ("benign", "harmful") for p in [q for q in prompts if q["family"] == fam][:args.limit]]
    values = {name: args.values for name in engine.arm_names}
    for item in args.grid:
        name, _, vs = item.partition("=")
        if name not in values:
            sys.exit(f"error: --grid {item}: unknown ARM {name!r}; this profile has {', '.join(values)}")
        try:
            values[name] = [float(v) for v in vs.split(",")]
        except ValueError:
            sys.exit(f"error: --grid {item}: expected NAME=V1,V2,... with numbers")
    grid = weight_grid(engine.arm_names, values)
    options = SamplingOptions(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              normalised=args.normalised, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, min_p=args.min_p)
    start = time.time()
    progress = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    records = [] if args.only_baselines else run_grid(engine, prompts, grid, args.seeds, options, progress=progress)
    if args.baselines:
        for name, system in BASELINES.items():
            records += [{**r, "baseline": True} for r in run_grid(
                engine, prompts, [{}], args.seeds, options, progress=progress, system_prompt=system, setting=name)]
    if args.dpo:
        dpo = Engine(load_models(replace(engine.profile, base=ModelSource(path=str(Path(args.dpo).resolve())),
                                         arms=())))
        records += [{**r, "baseline": True, "weights": {n: 0.0 for n in engine.arm_names}}
                    for r in run_grid(dpo, prompts, [{}], args.seeds, options, progress=progress,
                                      setting="DPO (LoRA, same pairs)")]
    if args.merge_into:
        run = {"prompts": len(prompts), "options": options.as_dict(), "values": {} if args.only_baselines else values}
        meta, records = merged(Path(args.merge_into), run, records)
        if args.read_judge:
            records = read_judge_records(records, ROOT / "runs/read_judge_tradeoff_features.pt")
        write_results(Path(args.out), meta, records)
        return
    meta = {"profile": engine.profile.name, "prompts": len(prompts), "seeds": args.seeds, "values": values,
            "options": options.as_dict(), "seconds": round(time.time() - start),
            "betas": engine.models.betas}
    if args.read_judge:
        records = read_judge_records(records, ROOT / "runs/read_judge_tradeoff_features.pt")
    write_results(out, meta, records)
    print(f"\n{len(records)} answers in {time.time() - start:.0f} s", file=sys.stderr)


def merged(old: Path, run: dict, records: list[dict]) -> tuple[dict, list[dict]]:
    """The results saved in `old` with these records added (a (setting, seed) in both: these
    records'), and their meta: `old`'s, its grid widened by run["values"] (new grid points, e.g.
    harmlessness=4, join the saved grid). run: this run's meta; its prompts and options must be
    the saved ones'."""
    meta = json.loads((old / "tradeoff.json").read_text())["meta"]
    if meta["options"] != run["options"] or meta["prompts"] != run["prompts"]:
        sys.exit(f"error: --merge-into {old}: its prompts or options differ from this run's")
    saved = [r for _, r in jsonl_records(old / "tradeoff_samples.jsonl", "trade-off answers")]
    records = merge_records(saved, records)
    meta = {k: v for k, v in meta.items() if k != "seconds"}  # the decoding time of a single run only
    meta["values"] = {n: sorted({*vs, *run["values"].get(n, [])}) for n, vs in meta["values"].items()}
    meta["seeds"] = sorted({r["seed"] for r in records})
    return meta, records


def write_results(out: Path, meta: dict, records: list[dict]):
    """tradeoff.json (meta + summary), tradeoff_samples.jsonl, tradeoff.png; prints the table."""
    summary = summarise(records, decoded_grid(meta["values"], records))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    (out / "tradeoff_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot(summary, out / "tradeoff.png", f"{meta['profile']}: {meta['prompts']} held-out prompts x "
                                        f"{len(meta['seeds'])} seeds")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
