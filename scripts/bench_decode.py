"""Decoding speed on the default profile (SmolLM2-135M-Instruct and its two shipped LoRA ARMs), in
one run: llama.cpp on the very GGUF the profile is read from (where llama-cpp-python is
installed: an optional extra of this benchmark), `transformers` generate in float32, and our
engine base alone, guided by both ARMs (1 pane) and the demo's two panes, in each weight mode,
plus each optimisation switched off in turn; tokens/s and ratios.

    python scripts/bench_decode.py [--tokens 64] [--repeats 3] [--modes float32 bfloat16 int4] [--switches]

Every timed run decodes exactly --tokens tokens (EOS is ignored) after one warm-up run. The demo's
rate is steps per second: each step gives every pane one token. llama.cpp:
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python   # about 10 min on 2 cores
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
from genarm_core.models import gguf_file_of, load_models  # noqa: E402
from genarm_core.worker import WORKER  # noqa: E402

PROMPT = "Give me three practical tips for keeping a small vegetable garden healthy."
MODES = {"float32": ("float32", "dense"), "bfloat16": ("bfloat16", "dense"), "int4": ("float32", "int4")}


def engine(profile, mode: str, **switches) -> Engine:
    dtype, weights = MODES[mode]
    options = replace(profile.engine, weights=weights, **switches)
    e = Engine(load_models(replace(profile, dtype=dtype, engine=options)))
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


def llama_cpp(profile, e: Engine, tokens: int, repeats: int) -> float | None:
    """llama.cpp on the profile's own GGUF, greedy, as many threads as torch: seconds per token,
    measured in a process of its own (its thread pool keeps spinning while it lives, which would
    slow what runs after it); None where llama-cpp-python is not installed."""
    import importlib.util
    import subprocess
    import sys

    path = gguf_file_of(profile.base)
    if importlib.util.find_spec("llama_cpp") is None or path is None:
        return None
    code = f"""
import statistics, time
from llama_cpp import Llama
llm = Llama({str(path)!r}, n_threads={torch.get_num_threads()}, n_ctx=512, verbose=False)
def run():
    llm.reset()
    for n, _ in enumerate(llm.generate({e.encode(PROMPT)!r}, temp=0.0, top_k=1), 1):
        if n == {tokens}:
            return n
run()
times = []
for _ in range({repeats}):
    t = time.perf_counter()
    n = run()
    times.append((time.perf_counter() - t) / n)
print(statistics.median(times))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


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
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--switches", action="store_true", help="also each optimisation off (guided, 1 pane)")
    args = ap.parse_args()
    profile = load_config().profile()
    arms = [a.name for a in profile.arms]
    steer = {n: 1.0 for n in arms}
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=args.tokens)
    sample = replace(greedy, temperature=0.7, top_p=0.9)
    caps = [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(v)]
    print(f"CPU: {_cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}{' (' + ' '.join(caps) + ')' if caps else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.tokens} new tokens, median of "
          f"{args.repeats}; profile {profile.name} ({len(arms)} LoRA ARMs)\n")
    f32 = engine(profile, "float32")
    rows = [("transformers generate, float32, base alone (greedy)", timed(hf_generate(f32, args.tokens), args.repeats))]
    ref = rows[0][1]
    cpp = llama_cpp(profile, f32, args.tokens, args.repeats)
    if cpp is not None:
        rows.append(("llama.cpp, the same GGUF, unguided (greedy)", cpp))
    del f32
    for mode in args.modes:
        full = engine(profile, mode)
        base_only = Engine(load_models(replace(profile, dtype=MODES[mode][0], arms=(),
                                               engine=replace(profile.engine, weights=MODES[mode][1]))))
        base_only.models.eos_ids = []
        rows += [(f"ours {mode}, base alone (greedy)", timed(ours(base_only, [{}], greedy), args.repeats)),
                 (f"ours {mode}, guided by both ARMs, 1 pane", timed(ours(full, [steer], sample), args.repeats)),
                 (f"ours {mode}, demo: base + guided panes (steps)", timed(ours(full, [{}, steer], sample), args.repeats))]
        if args.switches:
            for label, switch in [("shared trunk off", dict(shared_trunk=False)),
                                  ("batched LoRA off", dict(batched_lora=False)),
                                  ("native step off", dict(native_step=False)),
                                  ("product forms off (F.linear)", dict(forms="plain"))]:
                e = engine(profile, mode, **switch)
                rows.append((f"ours {mode}, guided 1 pane, {label}", timed(ours(e, [steer], sample), args.repeats)))
                del e
        del full, base_only
    cpp_time = dict(rows).get("llama.cpp, the same GGUF, unguided (greedy)")
    print("| setting | ms/token | tokens/s | vs generate f32 |" + (" vs llama.cpp |" if cpp_time else ""))
    print("|---|---|---|---|" + ("---|" if cpp_time else ""))
    for name, sec in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} | {ref / sec:.2f}x |"
              + (f" {cpp_time / sec:.2f}x |" if cpp_time else ""))
    if cpp_time is None:
        print("\n(llama.cpp not measured: pip install llama-cpp-python to compare)")


if __name__ == "__main__":
    main()
