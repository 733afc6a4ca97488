"""Decoding speed on the default profile (SmolLM2-135M-Instruct and its two shipped LoRA ARMs):
`transformers` generate on the base alone against our engine, base alone and guided, with each
optimisation switched off in turn, in float32 and bfloat16; tokens/s and ratios, one run.

    python scripts/bench_decode.py [--tokens 64] [--repeats 3] [--dtype float32 bfloat16]

Every timed run decodes exactly --tokens tokens (EOS is ignored) after one warm-up run.
"""
import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from genarm_core import Engine, SamplingOptions, load_config  # noqa: E402
from genarm_core.kernels import _cpu_name  # noqa: E402
from genarm_core.models import load_models  # noqa: E402
from genarm_core.worker import WORKER  # noqa: E402

PROMPT = "Give me three practical tips for keeping a small vegetable garden healthy."


def engine(profile, dtype, **switches) -> Engine:
    e = Engine(load_models(replace(profile, dtype=dtype, engine=replace(profile.engine, **switches))))
    e.models.eos_ids = []  # always decode the full length, so every run counts the same tokens
    return e


def timed(fn, repeats: int) -> float:
    """Median seconds per token over `repeats` runs (after a warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def hf_generate(e: Engine, tokens: int):
    model = e.models.base_model
    ids = torch.tensor([e.encode(PROMPT)])

    def run():
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=2)
        return out.shape[1] - ids.shape[1]
    return lambda: WORKER.call(run)  # on the thread that runs all model work (worker.py)


def ours(e: Engine, panes: list[dict], opts: SamplingOptions):
    def run():
        steps = 0
        for _ in e.stream(PROMPT, panes, opts):
            steps += 1
        return steps
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--demo-tokens", type=int, default=128, help="length of the demo-wait measurement")
    args = ap.parse_args()
    profile = load_config().profile()
    arms = [a.name for a in profile.arms]
    steer = {n: 1.0 for n in arms}
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=args.tokens)
    sample = replace(greedy, temperature=0.7, top_p=0.9)
    print(f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.tokens} new tokens, median of {args.repeats}; profile {profile.name} ({len(arms)} LoRA ARMs)")
    results = {}
    for dtype in args.dtype:
        full = engine(profile, dtype)
        base_only = Engine(load_models(replace(profile, dtype=dtype, arms=())))
        base_only.models.eos_ids = []
        rows = [("transformers generate, base alone (greedy)", timed(hf_generate(full, args.tokens), args.repeats)),
                ("ours, base alone (greedy)", timed(ours(base_only, [{}], greedy), args.repeats)),
                ("ours, base alone (sampling)", timed(ours(base_only, [{}], sample), args.repeats)),
                ("ours, guided by both ARMs, 1 pane", timed(ours(full, [steer], sample), args.repeats)),
                ("ours, demo: base + guided panes", timed(ours(full, [{}, steer], sample), args.repeats))]
        for label, switch in [("shared trunk off", dict(shared_trunk=False)),
                              ("batched LoRA off (one product per ARM)", dict(batched_lora=False)),
                              ("product forms off (F.linear)", dict(forms="plain"))]:
            e = engine(profile, dtype, **switch)
            rows.append((f"ours, guided 1 pane, {label}", timed(ours(e, [steer], sample), args.repeats)))
            del e
        demo = replace(sample, max_new_tokens=args.demo_tokens)
        t = time.perf_counter()
        ours(full, [{}, steer], demo)()
        wait = time.perf_counter() - t
        results[dtype] = dict(rows)
        ref = results[dtype]["transformers generate, base alone (greedy)"]
        print(f"\n## {dtype}\n| setting | ms/token | tokens/s | vs generate ({dtype}) |\n|---|---|---|---|")
        for name, sec in rows:
            print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} | {ref / sec:.2f}x |")
        print(f"\nA person waits {wait:.1f} s for a {args.demo_tokens}-token answer in both panes "
              f"({args.demo_tokens / wait:.1f} tok/s per pane).")
        del full, base_only
    best = min(r["transformers generate, base alone (greedy)"] for r in results.values())
    print("\n## against generate in its fastest dtype here\n| dtype | guided 1 pane | demo, 2 panes |\n|---|---|---|")
    for dtype, r in results.items():
        print(f"| {dtype} | {best / r['ours, guided by both ARMs, 1 pane']:.2f}x | "
              f"{best / r['ours, demo: base + guided panes']:.2f}x |")


if __name__ == "__main__":
    main()
