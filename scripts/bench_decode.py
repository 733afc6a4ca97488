"""Decoding speed on the default base (SmolLM2-135M-Instruct) with two randomly initialised
LoRA ARMs (r=8 on q,k,v,o of every layer), and with the default profile's trained ARMs when it
has them: tokens/s and ratios, all measured in one run.

    .venv/bin/python scripts/bench_decode.py [--tokens 64] [--repeats 3] [--dtype float32 bfloat16]
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from genarm_core.config import load_config, parse_config  # noqa: E402
from genarm_core.engine import Engine, SamplingOptions  # noqa: E402
from genarm_core.models import builtin_folder, load_models  # noqa: E402

PROMPT = "Give me three practical tips for keeping a small vegetable garden healthy."


def make_adapters(folder: Path, root: Path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    paths = []
    for i, name in enumerate(["arm_a", "arm_b"]):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(copy.deepcopy(base), config)
        peft_model.save_pretrained(root / name)
        # the same adapter merged into a full copy: a standalone model, run in its own forward
        merged = PeftModel.from_pretrained(copy.deepcopy(base), str(root / name)).merge_and_unload()
        merged.save_pretrained(root / f"{name}_merged")
        paths.append(name)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    for name in paths:
        tok.save_pretrained(root / f"{name}_merged")
    return paths


def engine(base_dir, arms, dtype):
    data = {"profiles": {"p": {"base": {"path": str(base_dir)}, "device": "cpu", "dtype": dtype, "arms": arms}}}
    return Engine(load_models(parse_config(data).profile()))


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    folder = builtin_folder("smollm2-135m-instruct")
    root = Path(tempfile.mkdtemp(prefix="genarm-bench-"))
    names = make_adapters(folder, root)
    lora = [{"name": n, "adapter": str(root / n)} for n in names]
    standalone = [{"name": n, "model": {"path": str(root / f"{n}_merged")}} for n in names]
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=args.tokens)
    sample = SamplingOptions(temperature=0.7, top_p=0.9, max_new_tokens=args.tokens, seed=0)
    print(f"{args.tokens} new tokens, median of {args.repeats}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for dtype in args.dtype:
        base_only = engine(folder, [], dtype)
        guided = engine(folder, lora, dtype)
        sequential = engine(folder, standalone, dtype)
        shipped_arms = [{"name": a.name, "adapter": a.adapter} for a in load_config().profile().arms if a.adapter]
        shipped = engine(folder, shipped_arms, dtype) if shipped_arms else None
        for e in (base_only, guided, sequential, shipped):
            if e is None:
                continue
            e.models.eos_ids = []  # always decode the full length, so every run counts the same tokens
        w = {n: 1.0 for n in names}
        ids = torch.tensor([base_only.encode(PROMPT)])
        model = base_only.models.backbone

        def hf_generate():
            with torch.inference_mode():
                out = model.generate(ids, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                     pad_token_id=2)
            return out.shape[1] - ids.shape[1]

        def ours(eng, weights, opts, panes=1):
            def run():
                n = 0
                for step in eng.stream(PROMPT, [dict(weights) for _ in range(panes)], opts):
                    n += 1
                return n
            return run

        rows = [
            ("transformers generate, base only (greedy)", timed(hf_generate, args.repeats)),
            ("ours, base only (greedy)", timed(ours(base_only, {}, greedy), args.repeats)),
            ("ours, base + 2 LoRA ARMs, one batched forward", timed(ours(guided, w, sample), args.repeats)),
            ("ours, base only (sampling)", timed(ours(base_only, {}, sample), args.repeats)),
            ("official way: 3 models, one forward each", timed(ours(sequential, w, sample), args.repeats)),
            ("ours, 2 ARMs, 2 panes in one batch", timed(ours(guided, w, sample, panes=2), args.repeats)),
        ]
        if shipped:
            rows.append((f"ours, the default profile's {len(shipped_arms)} trained ARMs (batched)",
                         timed(ours(shipped, {a["name"]: 1.0 for a in shipped_arms}, sample), args.repeats)))
        t = dict(rows)
        print(f"\n## {dtype}\n| setting | ms/token | tokens/s |\n|---|---|---|")
        for name, sec in rows:
            print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} |")
        print("\n| ratio | value |\n|---|---|")
        base_s = t["ours, base only (sampling)"]
        print(f"| ours base-only / generate (greedy) | {t['ours, base only (greedy)'] / t['transformers generate, base only (greedy)']:.2f} |")
        print(f"| guided 2 ARMs batched / base-only | {t['ours, base + 2 LoRA ARMs, one batched forward'] / base_s:.2f} |")
        print(f"| official way (3 forwards) / base-only | {t['official way: 3 models, one forward each'] / base_s:.2f} |")
        print(f"| 2 panes / 1 pane (2 ARMs) | {t['ours, 2 ARMs, 2 panes in one batch'] / t['ours, base + 2 LoRA ARMs, one batched forward']:.2f} |")
        if shipped:
            print(f"| default profile's trained ARMs / base-only | {rows[-1][1] / base_s:.2f} |")


if __name__ == "__main__":
    main()
