"""ARM training throughput and peak memory on SmolLM2-135M-Instruct (the offline builtin base).

    .venv/bin/python scripts/bench_train.py --pairs 32 --batch-size 4
    .venv/bin/python scripts/bench_train.py --loss dpo --lora-layers 20-29 --pairs 48 --batch-size 8 \
        --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj   # the DPO baseline's shape

Trains a LoRA ARM on synthetic preference pairs (no held-out evaluation) and prints pairs/s
(training steps only, model loading excluded) and the process's peak resident memory. With
--loss dpo it trains the DPO baseline twice, its reference forward first from the embedding, then
from the first adapted layer on the policy's hidden states (train.TrunkTap), and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = ("the a tea water river music cloud train book cat winter game map light green gold stone "
         "iron quick slow bright dark warm cold good kind fresh old new small large").split()


def synthetic_pairs(n: int, words: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    sentence = lambda k: " ".join(r.choices(WORDS, k=k)).capitalize() + "."  # noqa: E731
    return [{"prompt": f"Tell me about {r.choice(WORDS)} and {r.choice(WORDS)}.",
             "chosen": sentence(words), "rejected": sentence(words)} for _ in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32, help="training pairs (one epoch)")
    p.add_argument("--words", type=int, default=40, help="words per response")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--base-path", help="base model folder (default: the builtin SmolLM2-135M)")
    p.add_argument("--loss", default="arm", choices=("arm", "dpo"))
    p.add_argument("--lora-layers", help="e.g. 20-29 (default: every layer)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    args = p.parse_args()

    import torch

    from genarm_core.models import builtin_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base_path or str(builtin_folder("smollm2-135m-instruct"))
    layers = None
    if args.lora_layers:
        lo, _, hi = args.lora_layers.partition("-")
        layers = list(range(int(lo), int(hi or lo) + 1))
    if args.loss == "dpo":
        from genarm_core import train

        shared = train.first_adapted_layer
        train.first_adapted_layer = lambda model: 0  # the reference forward from the embedding
        full = run(args, base, layers, "reference from the embedding")
        train.first_adapted_layer = shared
        part = run(args, base, layers, "reference from the first adapted layer")
        print(f"shared trunk: {part / full:.2f}x the training throughput of the full reference forward")
    else:
        run(args, base, layers, "ARM")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def run(args, base: str, layers, what: str) -> float:
    """One training run; prints its numbers and returns its pairs/s."""
    import torch

    from genarm_core.train import TrainConfig, train_arm

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(args.pairs, args.words)))
        config = TrainConfig(data=[str(data)], objective="bench", output_dir=str(Path(tmp) / "arm"),
                             base_path=base, eval_fraction=0.0, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
                             max_length=1024, log_every=1, progress=False, loss=args.loss, lora_layers=layers,
                             target_modules=args.target_modules.split(","))
        t0 = time.perf_counter()
        result = train_arm(config)
        total = time.perf_counter() - t0
        log = [json.loads(line) for line in (Path(tmp) / "arm" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "train"]
    print(f"== {what}: {args.loss}, base: {base}, LoRA layers: {args.lora_layers or 'all'}")
    print(f"torch threads: {torch.get_num_threads()}, mixed precision: {args.mixed_precision}, "
          f"pairs: {result['pairs_seen']}, batch: {args.batch_size} pairs ({2 * args.batch_size} rows), "
          f"steps: {result['steps']}, ~{args.words}-word responses")
    print(f"training: {result['train_seconds']:.1f} s, {result['pairs_per_s']:.2f} pairs/s "
          f"({result['train_seconds'] / max(result['steps'], 1):.2f} s/step); whole run incl. loading {total:.1f} s")
    print(f"final train loss {steps[-1]['loss']:.4f}" if steps else "no steps")
    return result["pairs_per_s"]


if __name__ == "__main__":
    main()
