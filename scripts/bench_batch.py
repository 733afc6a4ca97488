"""Throughput of the engine alone (no HTTP) as users are added: each user streams one prompt in
the demo's two panes (base, harmlessness 2), all users submitted at once from threads; ms per
engine step, tokens/s against one user, and where a step's time goes (the forward, fusion and
sampling, output), timed by wrapping the engine's own phases.

    python scripts/bench_batch.py [--users 1 2 4 8] [--tokens 32] [--weights auto|dense|int4]

Each setting runs twice and the second run is printed (the first fills the prefix cache, so the
second measures decoding, not prefill).
"""
import argparse
import os
import threading
import time
from collections import defaultdict
from dataclasses import replace

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from genarm_core import Engine, SamplingOptions, engine as engine_module, load_config  # noqa: E402
from genarm_core.kernels import _cpu_name  # noqa: E402
from genarm_core.models import load_models  # noqa: E402

TOPICS = ["the moon", "bread", "maps", "bicycles", "rivers", "owls", "glass", "tea", "chess", "volcanoes"]


def timed_phases(e: Engine) -> dict:
    """Seconds spent in each phase of the engine's steps, accumulated while the dict lives."""
    spent = defaultdict(float)
    for owner, name, key in ((e.core.runner, "run", "forward"), (engine_module.sampler, "choose", "sampling"),
                             (engine_module.output, "emit", "output")):
        inner = getattr(owner, name)

        def wrapped(*a, _inner=inner, _key=key, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_key] += time.perf_counter() - t
        setattr(owner, name, wrapped)
    return spent


def run(e: Engine, users: int, options: SamplingOptions, spent: dict) -> dict:
    spent.clear()
    steps0 = e.core.steps
    streams = [e.stream(f"Tell me three facts about {TOPICS[i % len(TOPICS)]}.", [{}, {"harmlessness": 2.0}],
                        replace(options, seed=i)) for i in range(users)]
    tokens = [0] * users

    def consume(i):
        for step in streams[i]:
            tokens[i] += len(step)
    t = time.perf_counter()
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(users)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall, steps = time.perf_counter() - t, e.core.steps - steps0
    return dict(tokens=sum(tokens), wall=wall, steps=steps, split={k: v / steps for k, v in spent.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--weights", default="auto", choices=["auto", "dense", "int4", "int8"])
    args = ap.parse_args()
    profile = load_config().profile()
    if args.weights != "auto":
        profile = replace(profile, dtype="float32" if args.weights != "dense" else profile.dtype,
                          engine=replace(profile.engine, weights=args.weights))
    e = Engine(load_models(profile))
    e.models.eos_ids = []  # every run decodes the full length
    spent = timed_phases(e)
    print(f"CPU: {_cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("\n".join(e.models.runtime.lines()[1:4]))
    print(f"{args.tokens} tokens per pane, 2 panes per user, sampling (temperature 0.7, top-p 0.9)\n")
    print("| users | sequences | ms per step | tokens/s | vs 1 user | forward | sampling | output |\n|---|---|---|---|---|---|---|---|")
    options = SamplingOptions(temperature=0.7, top_p=0.9, max_new_tokens=args.tokens)
    one = None
    for users in args.users:
        run(e, users, options, spent)
        r = run(e, users, options, spent)
        rate = r["tokens"] / r["wall"]
        one = one or rate
        split = " | ".join(f"{r['split'].get(k, 0) * 1e3:.1f}" for k in ("forward", "sampling", "output"))
        print(f"| {users} | {2 * users} | {r['wall'] / r['steps'] * 1e3:.1f} | {rate:.1f} | {rate / one:.2f}x | {split} |",
              flush=True)


if __name__ == "__main__":
    main()
