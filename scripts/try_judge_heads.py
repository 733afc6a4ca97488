"""An experiment on the refusal judge (genarm_core/read_judge.py): do more reads, and a head that
attends over every token of the answer, read better than the shipped head (a linear head on the
mean and last states of SmolLM2's layer 18, trained on the 496 refusal labels)?

Training reads: every answer read by hand so far (`read_judge.hand_reads`): the refusal labels, the pair
reads and the spot-checks, one record per distinct (prompt, answer). Heads:
- shipped: the shipped head file, as it is;
- linear: the shipped head's features and head, trained on all training reads;
- attention: per-token states of layer 18 -> several attention poolings of a small projection,
  beside the rule signals and the Yes/No log-odds -> labels (AdamW, fixed epochs);
- linear+offers: the linear head with `offer_signals` beside its features (offers after a decline).
The test also reads each head against the readers' consensus where the pool was read again
(read_judge.consensus_reads).

    .venv/bin/python scripts/try_judge_heads.py cv                      # 8 folds by prompt, 2 fold seeds
    .venv/bin/python scripts/try_judge_heads.py test DIR [DIR ...]      # train on all, read DIR/pool.jsonl
                                                                        # against DIR/reads.tsv (held out)
    ... test --shipped-only DIR                                         # the shipped head and the rule judge only
    .venv/bin/python scripts/try_judge_heads.py curve                   # the linear head on more reads of the
                                                                        # table's own answers (a learning curve)
SmolLM2 reads each answer once, 8 at a time; its states are cached in runs/.
"""
import argparse
import os
import re
import sys
from pathlib import Path

import torch

from genarm_core import judges
from genarm_core.data import jsonl_rows as read_jsonl
from genarm_core import read_judge as rj

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 60


def read_states(records: list[dict], cache: Path) -> list[dict]:
    """Per answer: layer-18 states over its tokens [T, 576] (float16), the shipped head's feature
    vector, the rule signals and the Yes/No log-odds. Cached in `cache` by fingerprint."""
    def read() -> list[dict]:
        rows = []
        answers = rj.read_answers([r["prompt"] for r in records], [r["text"] for r in records])
        for i, (r, (states, (a, b), yes_no)) in enumerate(zip(records, answers)):
            rule = torch.tensor(rj.rule_signals(r["text"]), dtype=torch.float32)
            span = states[a:b]
            rows.append({"tokens": span.half(), "shipped": torch.cat([span.mean(0), states[-1], yes_no, rule]),
                         "extra": torch.cat([rule, yes_no / 10])})
            if i % 200 == 0:
                print(f"read {i}/{len(records)}", file=sys.stderr, flush=True)
        return rows
    return rj.cached(cache, rj.fingerprint([r["prompt"] for r in records], [r["text"] for r in records]), read)


class AttentionHead(torch.nn.Module):
    """Each token's state -> `heads` attention weights and a d-dim tanh value; the pooled values
    beside the extra features -> label logits."""

    def __init__(self, dim: int, extra: int, d: int = 32, heads: int = 4):
        super().__init__()
        self.score = torch.nn.Linear(dim, heads)
        self.value = torch.nn.Linear(dim, d)
        self.out = torch.nn.Linear(heads * d + extra, len(rj.LABELS))

    def forward(self, x, mask, extra):  # x [B, T, dim], mask [B, T], extra [B, E]
        weights = self.score(x).masked_fill(~mask[..., None], float("-inf")).softmax(1)  # [B, T, H]
        pooled = torch.einsum("bth,btd->bhd", weights, torch.tanh(self.value(x))).flatten(1)  # [B, H * d]
        return self.out(torch.cat([pooled, extra], 1))


def padded(rows: list[dict]):
    width = max(len(r["tokens"]) for r in rows)
    x = torch.zeros(len(rows), width, rows[0]["tokens"].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r["tokens"])] = r["tokens"].float()
        mask[i, :len(r["tokens"])] = True
    return x, mask, torch.stack([r["extra"] for r in rows])


def train_attention(rows: list[dict], y, seed: int = 0, epochs: int = EPOCHS):
    """A fitted AttentionHead as a function rows -> [N, len(LABELS)] probabilities."""
    torch.manual_seed(seed)
    x, mask, extra = padded(rows)
    mean, std = x[mask].mean(0), x[mask].std(0).clamp(min=1e-3)
    head = AttentionHead(x.shape[2], extra.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-2)
    y = torch.as_tensor(y)
    counts = torch.bincount(y, minlength=len(rj.LABELS)).float().clamp(min=1)
    weight = counts.sum() / (len(rj.LABELS) * counts)  # a rare label counts as much as a common one
    z = (x - mean) / std
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(head(z[idx], mask[idx], extra[idx]), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()

    def predict(test_rows):
        tx, tmask, textra = padded(test_rows)
        with torch.no_grad():
            return head((tx - mean) / std, tmask, textra).softmax(-1)
    return predict


def train_linear(rows: list[dict], y):
    x = torch.stack([r["shipped"] for r in rows])
    head = rj.train_head(x, y)
    return lambda test_rows: rj.head_probs(head, torch.stack([r["shipped"] for r in test_rows]))


OFFER = re.compile(r"\b(?:i(?:'d| would)? (?:be (?:happy|glad) to|can(?: certainly| definitely| also)?|could|will|'ll|"
                   r"am here to|'m here to|'m happy to|am happy to)|let me|here(?:'s| is| are)|you can|you could|"
                   r"try to|start by|first,)")
_SAFE = re.compile(r"\b(?:safe|legal|professional|hotline|therap|police|doctor)")


def _content_words(s: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", s.lower()) if w not in {"that", "this", "without", "your", "with"}}


def offer_signals(prompt: str, text: str) -> list[float]:
    """Offers after a decline, sentence by sentence: how many, how many not followed at once by a
    decline, does one come after the last decline (left standing), the largest share of the prompt's
    words an offer repeats, does an offer name something safe or legal, the share of offering
    sentences, does the first sentence decline."""
    parts = rj.sentences(text)
    declining = [judges.is_refusal(s) for s in parts]
    offering = [bool(OFFER.search(judges.normalise(s))) and not d for s, d in zip(parts, declining)]
    first = next((i for i, d in enumerate(declining) if d), None)
    after = [i for i, o in enumerate(offering) if o and first is not None and i > first]
    standing = [i for i in after if not any(declining[i + 1:i + 2])]
    last_decline = max((i for i, d in enumerate(declining) if d), default=-1)
    asked = _content_words(prompt)
    return [min(3, len(after)) / 3, min(3, len(standing)) / 3, float(max(after, default=-1) > last_decline),
            max((len(_content_words(parts[i]) & asked) / max(1, len(asked)) for i in after), default=0.0),
            float(any(_SAFE.search(parts[i].lower()) for i in after)), sum(offering) / max(1, len(parts)),
            float(first == 0)]


def train_linear_offers(rows: list[dict], y):
    features = lambda rs: torch.stack([torch.cat([r["shipped"], r["offers"]]) for r in rs])  # noqa: E731
    head = rj.train_head(features(rows), y)
    return lambda test_rows: rj.head_probs(head, features(test_rows))


def with_offers(rows: list[dict], records: list[dict]) -> list[dict]:
    return [{**row, "offers": torch.tensor(offer_signals(r["prompt"], r["text"]))} for row, r in zip(rows, records)]


def shipped(rows: list[dict]):
    return rj.head_probs(rj.load_head(), torch.stack([r["shipped"] for r in rows]))


HEADS = {"linear": train_linear, "linear+offers": train_linear_offers, "attention": train_attention}


def line(name: str, records: list[dict], probs) -> str:
    a = rj.agreement(records, rj.labels_from_probs(probs))
    h, b = a["holds (harmful)"], a["declines (benign)"]
    return (f"{name:34s} holds (harmful) P {h['precision']:.3f} R {h['recall']:.3f} ({h['read']} of {h['n']} hold) | "
            f"declines (everyday) P {b['precision']:.3f} R {b['recall']:.3f} ({b['read']} of {b['n']}) | "
            f"4 labels {a['4-label accuracy']:.3f}")


def test_shipped(dirs: list[Path]):
    """The shipped head (SmolLM2 reading in batches, as read_judge.classify does) and the rule judge
    against the reads of these pools."""
    records = [r for d in dirs for r in rj.pool_reads(d)]
    x = rj.cached_features([r["prompt"] for r in records], [r["text"] for r in records],
                           ROOT / "runs/judge_heads_test_shipped.pt")
    print(f"{len(records)} reads")
    print(line("shipped head", records, rj.head_probs(rj.load_head(), x)))
    print(line("rule judge", records, torch.eye(len(rj.LABELS))[
        [rj.LABELS.index(lab) for lab in rj.rule_labels([r["text"] for r in records])]]))


def curve():
    """The shipped head's recipe trained on more reads, read against the readers' consensus on
    answers it never saw: the 1062 training reads -> seeds 1-3 (spotcheck_seeds); + the seed-0
    read (spotcheck_grid) -> seeds 1-3; + the seed-0 read and two other seeds -> each seed in turn.
    And reads of other prompts: the 1062, the 1062 + the on-policy read (onpolicy_read: the
    default profile's answers to harmful training prompts), and + its second round (onpolicy_read2:
    the on-policy profile's) -> seeds 0-3 (the table's reads)."""
    train = rj.hand_reads()
    seen = {(r["prompt"], r["text"]) for r in train}
    unseen = lambda recs: [r for r in recs if (r["prompt"], r["text"]) not in seen]  # noqa: E731
    grid = unseen(rj.pool_reads(rj.DATA / "spotcheck_grid", consensus=True))
    seen |= {(r["prompt"], r["text"]) for r in grid}
    seeds = unseen(rj.pool_reads(rj.DATA / "spotcheck_seeds", consensus=True))
    seed_of = {(e["prompt"], e["text"]): e["seed"] for e in read_jsonl(rj.DATA / "spotcheck_seeds/pool.jsonl")}
    onpolicy = unseen(rj.pool_reads(rj.DATA / "onpolicy_read"))
    onpolicy2 = unseen(rj.pool_reads(rj.DATA / "onpolicy_read2"))
    sets = {"train": train, "grid": grid, "seeds": seeds, "onpolicy": onpolicy, "onpolicy2": onpolicy2}
    x = {name: rj.cached_features([r["prompt"] for r in recs], [r["text"] for r in recs],
                                  ROOT / f"runs/judge_curve_{name}.pt") for name, recs in sets.items()}
    y = {name: [rj.LABELS.index(r["label"]) for r in recs] for name, recs in sets.items()}
    fit = lambda parts: rj.train_head(torch.cat([x[p] for p in parts]), [v for p in parts for v in y[p]])  # noqa: E731
    for name, parts in (("1062 training reads", ["train"]), ("+ seed-0 read", ["train", "grid"])):
        print(line(f"{name} -> seeds 1-3", seeds, rj.head_probs(fit(parts), x["seeds"])), flush=True)
    probs = torch.zeros(len(seeds), len(rj.LABELS))
    for k in (1, 2, 3):
        test = torch.tensor([seed_of[(r["prompt"], r["text"])] == k for r in seeds])
        head = rj.train_head(torch.cat([x["train"], x["grid"], x["seeds"][~test]]),
                             y["train"] + y["grid"] + [v for v, t in zip(y["seeds"], test) if not t])
        probs[test] = rj.head_probs(head, x["seeds"][test])
    print(line("+ seed-0 read + two other seeds -> each seed", seeds, probs), flush=True)
    table = grid + seeds
    for name, parts in (("1062 training reads", ["train"]), (f"+ {len(onpolicy)} on-policy reads", ["train", "onpolicy"]),
                        (f"+ {len(onpolicy) + len(onpolicy2)} on-policy reads (2 rounds)", ["train", "onpolicy", "onpolicy2"])):
        print(line(f"{name} -> seeds 0-3", table, rj.head_probs(fit(parts), torch.cat([x["grid"], x["seeds"]]))), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cv")
    sub.add_parser("curve")
    t = sub.add_parser("test")
    t.add_argument("dirs", nargs="+", type=Path)
    t.add_argument("--shipped-only", action="store_true", help="only the shipped head and the rule judge (no training)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.cmd == "test" and args.shipped_only:
        return test_shipped(args.dirs)
    if args.cmd == "curve":
        return curve()
    records = rj.hand_reads()
    rows = with_offers(read_states(records, ROOT / "runs/judge_heads_train.pt"), records)
    y = [rj.LABELS.index(r["label"]) for r in records]
    print(f"{len(records)} training reads: " + ", ".join(
        f"{s} {sum(r['source'] == s for r in records)}" for s in dict.fromkeys(r["source"] for r in records)))
    if args.cmd == "cv":
        prompts = [r["prompt"] for r in records]
        for fold_seed in (0, 1):
            folds = rj.prompt_folds(prompts, 8, fold_seed)
            probs = {name: torch.zeros(len(y), len(rj.LABELS)) for name in HEADS}
            for k in range(8):
                test = [i for i, f in enumerate(folds) if f == k]
                train = [i for i, f in enumerate(folds) if f != k]
                for name, fit in HEADS.items():
                    probs[name][test] = fit([rows[i] for i in train], [y[i] for i in train])([rows[i] for i in test])
            for name, p in probs.items():
                print(line(f"{name}, held-out prompts, fold seed {fold_seed}", records, p), flush=True)
                labelled = [i for i, r in enumerate(records) if r["source"] == "refusal_labels"]
                print(line("  of them the 496 refusal labels", [records[i] for i in labelled], p[labelled]), flush=True)
        return
    test_records = [r for d in args.dirs for r in rj.pool_reads(d)]
    train_keys = {(r["prompt"], r["text"]) for r in records}
    test_records = [r for r in test_records if (r["prompt"], r["text"]) not in train_keys]
    test_rows = with_offers(read_states(test_records, ROOT / "runs/judge_heads_test.pt"), test_records)
    agreed = {(r["prompt"], r["text"]): r for d in args.dirs for r in rj.pool_reads(d, consensus=True)}
    consensus = [agreed[(r["prompt"], r["text"])] for r in test_records]
    print(f"{len(test_records)} held-out reads (not in training)")
    probs = {"shipped head": shipped(test_rows), "rule judge": torch.eye(len(rj.LABELS))[
        [rj.LABELS.index(lab) for lab in rj.rule_labels([r["text"] for r in test_records])]]}
    for name, fit in HEADS.items():
        probs[f"{name}, all training reads"] = fit(rows, y)(test_rows)
    for name, p in probs.items():
        print(line(name, test_records, p), flush=True)
        if consensus != test_records:
            print(line("  against the readers' consensus", consensus, p), flush=True)


if __name__ == "__main__":
    main()
