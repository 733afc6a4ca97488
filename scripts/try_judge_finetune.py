"""An experiment on the refusal judge (genarm_core/read_judge.py): does fine-tuning the reader itself
read better than heads on its frozen states? SmolLM2-135M-Instruct reads each answer as the shipped
judge does (prompt, answer, then read_judge.QUESTION); its layers from FROM_LAYER up get LoRA
adapters and a linear head reads the final state at the last token, the mean final state over the
answer and the rule signals. The frozen lower layers run once per answer: their output is cached.

    .venv/bin/python scripts/try_judge_finetune.py cv               # 4 folds by prompt over the training reads
    .venv/bin/python scripts/try_judge_finetune.py test DIR         # train on all reads, read DIR (held out)

Training reads: `read_judge.hand_reads()` (1062 answers). Cached states go to runs/.
Measured (Intel Xeon, 2 cores, defaults: layers 20-29, r=8, 3 epochs): a fold takes about 6 min;
folds 0 and 1 of `cv` gave holds P 0.806 / 0.814, R 0.794 / 0.608 (the linear head on frozen
states: P 0.81, R 0.78 by prompt), so it was stopped there and is not shipped.
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from genarm_core import read_judge as rj

ROOT = Path(__file__).resolve().parent.parent


def cached_states(records: list[dict], layer: int, cache: Path) -> list[dict]:
    """Per answer: the input of `layer` over the whole read sequence [T, hidden] (float16), the
    answer's span (a, b) and the rule signals [N_RULE]; cached in `cache` by fingerprint."""
    def read() -> list[dict]:
        rows = []
        answers = rj.read_answers([r["prompt"] for r in records], [r["text"] for r in records], layer=layer)
        for i, (r, (states, span, _)) in enumerate(zip(records, answers)):
            rows.append({"h": states.half(), "span": span,
                         "rule": torch.tensor(rj.rule_signals(r["text"]), dtype=torch.float32)})
            if i % 200 == 0:
                print(f"read {i}/{len(records)}", file=sys.stderr, flush=True)
        return rows
    key = rj.fingerprint([r["prompt"] for r in records], [r["text"] for r in records]) + f"|{layer}"
    return rj.cached(cache, key, read)


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) B A x, W frozen; B starts at zero so training starts from the reader."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


class TunedReader(torch.nn.Module):
    """SmolLM2's layers from `first` up (LoRA on every projection), its final norm and a label head."""

    def __init__(self, lm, first: int, rank: int, alpha: float):
        super().__init__()
        for p in lm.parameters():
            p.requires_grad_(False)
        self.layers = torch.nn.ModuleList(lm.model.layers[first:])
        for layer in self.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, LoRALinear(child, rank, alpha))
        self.norm, self.rotary = lm.model.norm, lm.model.rotary_emb
        hidden = lm.config.hidden_size
        self.head = torch.nn.Linear(2 * hidden + rj.N_RULE, len(rj.LABELS))

    def forward(self, h, lengths, spans, rule):
        """h: [B, T, hidden] right-padded (causal attention: padding at the end changes nothing
        before it); lengths [B]; spans list of (a, b); rule [B, N_RULE] -> logits [B, labels]."""
        B, T, _ = h.shape
        pos = torch.arange(T).expand(B, T)
        pe = self.rotary(h, pos)
        for layer in self.layers:
            h = layer(h, position_ids=pos, position_embeddings=pe)
        h = self.norm(h)  # [B, T, hidden]
        last = h[torch.arange(B), lengths - 1]
        mean = torch.stack([h[i, a:b].mean(0) for i, (a, b) in enumerate(spans)])
        return self.head(torch.cat([last, mean, rule], -1))


def batches(rows: list[dict], idx: list[int], size: int, shuffle: bool, seed: int):
    """Batches of indices of similar length (sorted in chunks of 8 batches), shuffled if asked."""
    idx = list(idx)
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
    chunk = size * 8
    out = []
    for i in range(0, len(idx), chunk):
        part = sorted(idx[i:i + chunk], key=lambda j: len(rows[j]["h"]))
        out += [part[k:k + size] for k in range(0, len(part), size)]
    if shuffle:
        rng.shuffle(out)
    return out


def collate(rows, idx):
    T = max(len(rows[j]["h"]) for j in idx)
    h = torch.zeros(len(idx), T, rows[idx[0]]["h"].shape[1])
    for i, j in enumerate(idx):
        h[i, :len(rows[j]["h"])] = rows[j]["h"].float()
    lengths = torch.tensor([len(rows[j]["h"]) for j in idx])
    return h, lengths, [rows[j]["span"] for j in idx], torch.stack([rows[j]["rule"] for j in idx])


def train(rows, y, idx, args, seed=0):
    """A TunedReader trained on rows[idx] with labels y (label indices)."""
    torch.manual_seed(seed)
    _, lm = rj._reader()
    model = TunedReader(copy.deepcopy(lm), args.from_layer, args.rank, args.alpha)
    counts = torch.bincount(torch.tensor([y[j] for j in idx]), minlength=len(rj.LABELS)).float().clamp(min=1)
    weight = (counts.sum() / (len(rj.LABELS) * counts)) ** args.class_power
    lora = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")]
    opt = torch.optim.AdamW([{"params": lora, "lr": args.lr}, {"params": model.head.parameters(), "lr": args.head_lr}],
                            weight_decay=0.01)
    plan = [b for e in range(args.epochs) for b in batches(rows, idx, args.batch, True, seed * 100 + e)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / len(plan)))
    model.train()
    t0 = time.time()
    for step, b in enumerate(plan):
        h, lengths, spans, rule = collate(rows, b)
        loss = torch.nn.functional.cross_entropy(model(h, lengths, spans, rule), torch.tensor([y[j] for j in b]),
                                                 weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step}/{len(plan)} loss {loss.item():.3f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return model.eval()


def predict(model, rows, idx) -> torch.Tensor:
    probs = torch.zeros(len(idx), len(rj.LABELS))
    order = {j: i for i, j in enumerate(idx)}
    with torch.inference_mode():
        for b in batches(rows, idx, 16, False, 0):
            h, lengths, spans, rule = collate(rows, b)
            p = torch.softmax(model(h, lengths, spans, rule), -1)
            for k, j in enumerate(b):
                probs[order[j]] = p[k]
    return probs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["cv", "test"])
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--from-layer", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--class-power", type=float, default=0.5)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train_records = rj.hand_reads()
    rows = cached_states(train_records, args.from_layer, ROOT / f"runs/finetune_train_L{args.from_layer}.pt")
    y = [rj.LABELS.index(r["label"]) for r in train_records]
    report = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.mode == "cv":
        folds = rj.prompt_folds([r["prompt"] for r in train_records], args.folds)
        probs = torch.zeros(len(rows), len(rj.LABELS))
        for k in range(args.folds):
            test = [i for i, f in enumerate(folds) if f == k]
            model = train(rows, y, [i for i, f in enumerate(folds) if f != k], args)
            probs[test] = predict(model, rows, test)
            print(f"fold {k}:", json.dumps(rj.agreement([train_records[i] for i in test],
                                                        rj.labels_from_probs(probs[test]))["holds (harmful)"]),
                  flush=True)
        report["cv"] = rj.agreement(train_records, rj.labels_from_probs(probs))
        report["cv_probs"] = probs.tolist()
    else:
        model = train(rows, y, list(range(len(rows))), args)
        for d in args.dirs:
            records = rj.pool_reads(ROOT / d)
            known = {(r["prompt"], r["text"]) for r in train_records}
            records = [r for r in records if (r["prompt"], r["text"]) not in known]
            test_rows = cached_states(records, args.from_layer,
                                      ROOT / f"runs/finetune_{Path(d).name}_L{args.from_layer}.pt")
            probs = predict(model, test_rows, list(range(len(test_rows))))
            report[d] = rj.agreement(records, rj.labels_from_probs(probs))
            report[d + " probs"] = probs.tolist()
    print(json.dumps({k: v for k, v in report.items() if "probs" not in k}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
