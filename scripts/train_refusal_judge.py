"""Trains the refusal judge's head (genarm_core/read_judge.py) on the answers read by hand and
measures it against reading on held-out prompts and on a held-out read; writes
space_assets/judge/refusal_head.safetensors and space_assets/judge/metrics.json.

    .venv/bin/python scripts/train_refusal_judge.py            # about 5 min on 2 CPU cores
    ... --folds 8 --fold-seeds 0 1 2                            # cross-validation by prompt
    ... --test space_assets/data/spotcheck_grid ...             # reads never trained on (default: grid and seeds)
    ... --labels space_assets/data/refusal_labels.jsonl         # only these labels (the earlier head's)
    ... --features-cache runs/refusal_judge_features.pt         # reuse SmolLM2's reading

Training reads: read_judge.hand_reads(), every answer of the repository read by hand (the refusal
labels, the pair reads, the spot-checks of earlier ARMs), once per distinct (prompt, answer).
Cross-validation splits by prompt: all answers to a prompt are in one fold, so no prompt is in
both a head's training and its test answers. Every labelled answer is predicted once per fold
seed by a head that never saw its prompt; precision and recall of "declines and holds" (harmful
prompts) and "declines at all" (everyday prompts) are computed over those predictions, for the
new judge and for the rule judge (judges.is_refusal) on the same answers. The shipped head is then
fitted on all training reads and measured on the --test reads (answers in training left out).
Same reads, same machine: the same tensors, bit for bit (safetensors may order the metadata differently).
"""
import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from genarm_core import read_judge as rj

METRICS_FILE = ROOT / "space_assets/judge/metrics.json"


def read_labels(path: Path | None, limit: int | None = None) -> list[dict]:
    """The training reads: a labels JSONL, or (None) every hand read of the repository."""
    records = rj.hand_reads() if path is None else [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records[:limit] if limit else records


def held_out(records: list[dict], dirs: list[Path], x_cache: Path | None, head: dict) -> dict:
    """The fitted head and the rule judge against the reads of these pools, less any answer that
    is in training: against the first reader (reads.tsv) and, where a pool was read again, the
    readers' consensus (read_judge.consensus_reads)."""
    trained = {(r["prompt"], r["text"]) for r in records}
    fresh = lambda consensus: [r for d in dirs for r in rj.pool_reads(d, consensus)  # noqa: E731
                               if (r["prompt"], r["text"]) not in trained]
    test, agreed = fresh(False), fresh(True)
    if not test:
        return {}
    x = load_features(test, x_cache)
    predicted = {"read judge": rj.labels_from_probs(rj.head_probs(head, x)),
                 "rule judge": rj.rule_labels([r["text"] for r in test])}
    out = {"pools": [d.name for d in dirs], **{name: rj.agreement(test, p) for name, p in predicted.items()}}
    if [r["label"] for r in agreed] != [r["label"] for r in test]:
        out["readers' consensus"] = {name: rj.agreement(agreed, p) for name, p in predicted.items()}
    return out


def load_features(records: list[dict], cache: Path | None, reader=None):
    return rj.cached_features([r["prompt"] for r in records], [r["text"] for r in records], cache, reader)


def validate(records: list[dict], x, folds: int, seeds: list[int], weight_decay: float) -> dict:
    """Held-out agreement with reading per fold seed, for the read judge and the rule judge."""
    y = [rj.LABELS.index(r["label"]) for r in records]
    prompts = [r["prompt"] for r in records]
    rule = rj.agreement(records, rj.rule_labels([r["text"] for r in records]))
    runs = []
    for seed in seeds:
        probs = rj.cross_validate(x, y, rj.prompt_folds(prompts, folds, seed), weight_decay)
        runs.append({"fold_seed": seed, **rj.agreement(records, rj.labels_from_probs(probs))})
    return {"read judge (held-out prompts)": runs, "rule judge": rule}


def fit(records: list[dict], x, weight_decay: float) -> dict:
    return rj.train_head(x, [rj.LABELS.index(r["label"]) for r in records], weight_decay)


def print_lines(title: str, rows: list[tuple[str, dict]]):
    """One line of precision and recall against reading per (name, agreement)."""
    print(title)
    for name, m in rows:
        h, b = m["holds (harmful)"], m["declines (benign)"]
        print(f"  {name:32s} holds (harmful) P {h['precision']:.3f} R {h['recall']:.3f} ({h['read']} read) | "
              f"declines (benign) P {b['precision']:.3f} R {b['recall']:.3f} ({b['read']} read) | "
              f"4 labels {m['4-label accuracy']:.3f}")


def print_report(report: dict):
    print_lines("cross-validated by prompt", [("rule judge", report["rule judge"])] + [
        (f"read judge, fold seed {run['fold_seed']}", run) for run in report["read judge (held-out prompts)"]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", help="train on this labels JSONL only (default: every hand read, read_judge.hand_reads)")
    ap.add_argument("--test", nargs="*", type=Path, default=[rj.DATA / "spotcheck_grid", rj.DATA / "spotcheck_seeds"],
                    help="read pools held out from training (pool.jsonl + reads.tsv)")
    ap.add_argument("--head", default=str(rj.HEAD_PATH), help="where the fitted head goes")
    ap.add_argument("--metrics", default=str(METRICS_FILE))
    ap.add_argument("--folds", type=int, default=8)
    ap.add_argument("--fold-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--weight-decay", type=float, default=rj.WEIGHT_DECAY)
    ap.add_argument("--limit", type=int, help="only the first N labels (a quick check)")
    ap.add_argument("--features-cache", help="a .pt file: SmolLM2's reading of the labels, reused when they match")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    records = read_labels(Path(args.labels) if args.labels else None, args.limit)
    cache = Path(args.features_cache) if args.features_cache else None
    x = load_features(records, cache)
    report = validate(records, x, args.folds, args.fold_seeds, args.weight_decay)
    print_report(report)
    head = fit(records, x, args.weight_decay)
    test = held_out(records, args.test, cache.with_name(cache.stem + "_test.pt") if cache else None, head)
    if test:
        print_lines(f"held-out read ({', '.join(test['pools'])})",
                    [("rule judge", test["rule judge"]), ("read judge", test["read judge"])])
        if "readers' consensus" in test:
            print_lines("the same answers, against the readers' consensus", list(test["readers' consensus"].items()))
    rj.save_head(head, Path(args.head), {"labels_file": Path(args.labels).name if args.labels else "hand_reads",
                                          "records": str(len(records)),
                                          "features": rj.fingerprint([r["prompt"] for r in records], [r["text"] for r in records]),
                                          "weight_decay": str(args.weight_decay)})
    Path(args.metrics).write_text(json.dumps({"labels": len(records), "folds": args.folds,
                                              "weight_decay": args.weight_decay, **report,
                                              "held-out read": test}, indent=1) + "\n")
    print(f"head: {args.head}\nmetrics: {args.metrics}")


if __name__ == "__main__":
    main()
