"""Builds the preference datasets for the helpfulness and harmlessness ARMs (all three steps:
scripts/build_demo_data.sh).

    .venv/bin/python scripts/build_preference_data.py --sample-only             # 1. first samples
    .venv/bin/python scripts/build_preference_data.py --extra-samples [--shard I --shards N]  # 2.
    .venv/bin/python scripts/build_preference_data.py --reuse-samples           # 3. label and pair

Steps: read the prompt banks (data/prompts_*.txt), split them by prompt into train and held-out,
sample SmolLM2-135M-Instruct on every prompt (and, on harmful prompts, once more under a safety
system prompt), then sample more: up to 3 more plain answers per prompt, and one answer that
starts with a forced refusal opener ("I'm sorry, but I can't", ...) which SmolLM2 continues in its
own words. Add the written responses (data/written_responses.json), score everything with
genarm_core.judges and form pairs. Deterministic given --seed and --shards (sampling is seeded per
batch; pairing uses seeded RNGs). See space_assets/DATA_CARD.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATA = ROOT / "data"
OUT = ROOT / "space_assets" / "data"
HELDOUT_FRACTION = 0.15  # of each category, on top of all role-play prompts
ROLE_PLAY = re.compile(r"^(pretend|imagine|you are|you're|act as|role-play|roleplay)\b", re.I)
SAFETY_SYSTEM = ("You are a careful, responsible assistant. If a request could hurt anyone or break "
                 "the law, politely refuse and suggest a safe alternative or where to get help.")


# ---- prompts and split ----------------------------------------------------------------------
def read_bank(path: Path, family: str) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        category, prompt = (s.strip() for s in line.split("|", 1))
        rows.append({"prompt": prompt, "family": family, "category": category})
    return rows


def load_prompts() -> list[dict]:
    rows = read_bank(DATA / "prompts_benign.txt", "benign") + read_bank(DATA / "prompts_harmful.txt", "harmful")
    seen = Counter(r["prompt"] for r in rows)
    dup = [p for p, n in seen.items() if n > 1]
    if dup:
        raise SystemExit(f"duplicate prompts: {dup}")
    return rows


def split_prompts(rows: list[dict], seed: int) -> None:
    """Adds "split": every role-play prompt is held out (a phrasing style never trained on),
    plus a seeded HELDOUT_FRACTION of the other prompts of each category."""
    by_cat: dict[tuple, list[dict]] = {}
    for r in rows:
        r["split"] = "heldout" if ROLE_PLAY.match(r["prompt"]) else "train"
        if r["split"] == "train":
            by_cat.setdefault((r["family"], r["category"]), []).append(r)
    for key in sorted(by_cat):
        group = by_cat[key]
        rng = random.Random(f"{seed}/{key[0]}/{key[1]}")
        for r in rng.sample(group, round(HELDOUT_FRACTION * len(group))):
            r["split"] = "heldout"


# ---- sampling -------------------------------------------------------------------------------
def load_engine(dtype: str):
    import torch

    from genarm_core.config import load_config
    from genarm_core.engine import Engine
    from genarm_core.models import load_models

    torch.set_num_threads(int(os.environ.get("GENARM_THREADS", "1")))  # 1 thread: fastest on a shared 2-core CPU
    profile = load_config().profile()
    return Engine(load_models(replace(profile, dtype=dtype) if dtype != "auto" else profile))


def sample_all(rows: list[dict], args) -> list[dict]:
    """One plain sample per prompt; on harmful prompts one more under SAFETY_SYSTEM. Jobs are
    sorted by prompt length (less padding) and batched; batch b uses seed args.seed + b."""
    from genarm_core.engine import SamplingOptions

    engine = load_engine(args.dtype)
    jobs = [(r, "plain") for r in rows] + [(r, "safety_prompted") for r in rows if r["family"] == "harmful"]
    jobs.sort(key=lambda j: (j[1], len(j[0]["prompt"]), j[0]["prompt"]))
    out, t0 = [], time.time()
    for b in range(0, len(jobs), args.batch):
        chunk = jobs[b:b + args.batch]
        prompts = [r["prompt"] if kind == "plain" else
                   [{"role": "system", "content": SAFETY_SYSTEM}, {"role": "user", "content": r["prompt"]}]
                   for r, kind in chunk]
        opts = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens,
                               seed=args.seed + b // args.batch)
        for (r, kind), c in zip(chunk, engine.generate(prompts, {}, opts)):
            out.append({"prompt": r["prompt"], "family": r["family"], "category": r["category"],
                        "kind": kind, "text": c.text.strip(), "finish_reason": c.finish_reason})
        print(f"  sampled {min(b + args.batch, len(jobs))}/{len(jobs)} ({time.time() - t0:.0f} s)", flush=True)
    return out


# Refusal openers forced at the start of the answer; SmolLM2 writes the rest, so the refusal is in
# the model's own style and about the prompt (the harmful prompts' chosen answers for harmlessness
# and the benign prompts' rejected ones, so that the ARM learns *when* to decline, not a style).
REFUSAL_OPENERS = ["I'm sorry, but I can't", "I can't help with", "I won't", "Sorry, I can't",
                   "I'm not able to help with", "I must decline", "I cannot assist with",
                   "I'm sorry, I can't", "I can't provide", "I'm afraid I can't",
                   "I don't think I should", "I have to decline"]
EXTRA_PLAIN = {"benign": 3, "harmful": 2}  # more plain samples per prompt: on-policy best-vs-worst pairs
FORCED_MAX_NEW_TOKENS = 40


def extra_jobs(rows: list[dict], seed: int) -> list[tuple[dict, str, str]]:
    """(row, kind, forced answer prefix) for the second sampling round (--extra-samples)."""
    jobs = []
    for r in rows:
        jobs += [(r, f"plain{k}", "") for k in range(1, EXTRA_PLAIN[r["family"]] + 1)]
        jobs.append((r, "forced_refusal", random.Random(f"{seed}/opener/{r['prompt']}").choice(REFUSAL_OPENERS)))
    jobs.sort(key=lambda j: (j[1] == "forced_refusal", len(j[0]["prompt"]), j[0]["prompt"], j[1]))
    return jobs


def sample_extra(rows: list[dict], args) -> list[dict]:
    """Samples this shard's share (every args.shards-th job) of extra_jobs; a forced prefix is
    appended to the prompt's tokens and kept as the start of the answer."""
    from genarm_core import Completion, SamplingOptions

    engine = load_engine(args.dtype)
    tok = engine.tokenizer
    jobs = extra_jobs(rows, args.seed)[args.shard::args.shards]
    out, t0 = [], time.time()
    batches = []  # (forced, jobs): plain and forced jobs apart, as they differ in max_new_tokens
    for forced in (False, True):
        group = [j for j in jobs if (j[1] == "forced_refusal") == forced]
        batches += [(forced, group[b:b + args.batch]) for b in range(0, len(group), args.batch)]
    for n, (forced, chunk) in enumerate(batches):
        prefixes = [tok(prefix, add_special_tokens=False)["input_ids"] if prefix else [] for _, _, prefix in chunk]
        encoded = [engine.encode(r["prompt"]) + ids for (r, _, _), ids in zip(chunk, prefixes)]
        opts = SamplingOptions(temperature=0.8, top_p=0.95, seed=args.seed + 1000 * (args.shard + 1) + n,
                               max_new_tokens=FORCED_MAX_NEW_TOKENS if forced else args.max_new_tokens)
        results = [Completion() for _ in chunk]
        for step in engine.stream_ids(encoded, [{}], opts):
            for ev in step:
                results[ev.prompt].add(ev)
        for (r, kind, _), c, pre in zip(chunk, results, prefixes):
            out.append({"prompt": r["prompt"], "family": r["family"], "category": r["category"], "kind": kind,
                        "text": tok.decode(pre + c.token_ids, skip_special_tokens=True).strip(),
                        "finish_reason": c.finish_reason})
        print(f"  shard {args.shard}: sampled {len(out)}/{len(jobs)} ({time.time() - t0:.0f} s)",
              flush=True)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    from genarm_core.data import jsonl_records

    return [record for _, record in jsonl_records(path, "samples")]


# ---- candidate responses --------------------------------------------------------------------
MARGIN = {"helpfulness": 0.1, "harmlessness": 0.25}
# Pairs per objective and split; seeded subsample above this. Helpfulness keeps all its train pairs
# (1197, 45% of them between two of SmolLM2's own answers).
MAX_PAIRS = {("helpfulness", "train"): 1200, ("harmlessness", "train"): 720,
             ("helpfulness", "heldout"): 200, ("harmlessness", "heldout"): 200}


def first_sentence(text: str) -> str | None:
    """The sample's first sentence: an on-policy text with the same style but less substance."""
    parts = re.split(r"(?<=[^\d][.!?:])\s+", text.strip(), maxsplit=1)
    if len(parts) < 2 or len(parts[0].split()) < 3 or len(parts[0]) > 0.5 * len(text):
        return None
    return parts[0]


def trim_to_sentence(text: str, finish_reason: str | None) -> str:
    """A sample cut off by max_new_tokens ends mid-sentence while written responses never do; trim
    it to its last full sentence (when that keeps at least half of it) so that "ends abruptly"
    does not mark the sampled side of a pair."""
    text = text.strip()
    if finish_reason != "length":
        return text
    ends = [m.end() for m in re.finditer(r"(?<!\d)[.!?](?=\s|$)", text)]
    return text[:ends[-1]] if ends and ends[-1] >= 0.5 * len(text) else text


PLAIN_KINDS = ["plain"] + [f"plain{k}" for k in range(1, max(EXTRA_PLAIN.values()) + 1)]


def candidates(row: dict, samples: dict, written: dict, others: list[str], rng: random.Random) -> dict:
    """Named responses for one prompt. policy<k>: SmolLM2's own plain samples; forced_refusal:
    SmolLM2 continuing a refusal opener; policy_safety: SmolLM2 under a safety system prompt;
    written_*: data/written_responses.json."""
    plain = [samples.get((row["prompt"], k), "") for k in PLAIN_KINDS]
    cands = {f"policy{i}": t for i, t in enumerate(plain)}
    cands |= {"forced_refusal": samples.get((row["prompt"], "forced_refusal"), ""),
              "written_refusal": rng.choice(written["refusals"]), "written_terse": rng.choice(written["terse"])}
    short = first_sentence(plain[0])
    if short:
        cands["policy_truncated"] = short
    if others:
        cands["policy_offtopic"] = rng.choice(others)
    if row["family"] == "harmful":
        topical = written["redirects"].get(row["category"], [])
        pool = topical if topical and rng.random() < 0.6 else written["generic_redirects"]
        cands["written_redirect"] = rng.choice(pool)
        cands["written_compliance"] = rng.choice(written["compliance_openers"])
        cands["policy_safety"] = samples.get((row["prompt"], "safety_prompted"), "")
    else:
        cands["written_redirect"] = rng.choice(written["generic_redirects"])
    return {k: v for k, v in cands.items() if v.strip()}


# Pair recipes per objective and family: (source A, source B). policy_best / policy_worst are the
# plain samples the objective's judge ranks highest / lowest, policy_any a random one. The first
# MUST recipes are always tried, then the others in random order, up to PER_PROMPT pairs; the
# judge's scores decide which side is chosen, and a pair is kept only when they differ by MARGIN.
# - helpfulness learns what its judge prefers among the model's own answers (best vs worst of up
#   to 4 samples) and that answers beat terse, truncated or off-topic text. It has no refusal
#   pairs: with them (24% of its pairs) it learned "never open with a refusal" so firmly that with
#   both ARMs on it overruled the harmlessness ARM on every harmful prompt (0% refusals). Its judge
#   still scores refusals as unhelpful and, as in PKU-SafeRLHF, compliance as more helpful;
# - harmlessness sees the same kind of text on both sides: on harmful prompts SmolLM2's own
#   refusal beats its own compliance, on benign prompts its own answer beats its own refusal, so
#   that it learns *when* to decline rather than a refusal style.
RECIPES = {
    ("helpfulness", "benign"): [("policy_best", "policy_worst"), ("policy_second", "policy_worst"),
                                ("policy_best", "policy_third"), ("policy_any", "written_terse"),
                                ("policy_any", "policy_truncated"), ("policy_any", "policy_offtopic")],
    ("helpfulness", "harmful"): [("policy_best", "policy_worst"), ("policy_second", "policy_worst"),
                                 ("policy_any", "written_terse"), ("policy_any", "policy_truncated")],
    ("harmlessness", "harmful"): [("forced_refusal", "policy_worst"), ("forced_refusal", "policy_any"),
                                  ("written_redirect", "written_compliance"), ("written_redirect", "policy_any"),
                                  ("policy_safety", "policy_any"), ("forced_refusal", "written_compliance"),
                                  ("written_refusal", "policy_any")],
    ("harmlessness", "benign"): [("policy_best", "forced_refusal"), ("policy_worst", "forced_refusal"),
                                 ("policy_any", "written_refusal")],
}
MUST = {("helpfulness", "benign"): 3, ("helpfulness", "harmful"): 2,
        ("harmlessness", "harmful"): 3, ("harmlessness", "benign"): 2}
PER_PROMPT = {("helpfulness", "benign"): 4, ("helpfulness", "harmful"): 3,
              ("harmlessness", "harmful"): 3, ("harmlessness", "benign"): 2}


def kind(source: str) -> str:
    return re.sub(r"\d+$", "", source.split("_")[0])


def prompt_pairs(objective: str, row: dict, cands: dict, scores: dict, rng: random.Random,
                 cut_off: set[str]) -> list[dict]:
    """Up to PER_PROMPT pairs for one prompt; texts in `cut_off` (samples that hit the token
    limit) are marked incomplete, so training appends no EOS to them."""
    key = (objective, row["family"])
    plain = sorted((k for k in cands if re.fullmatch(r"policy\d+", k)), key=lambda k: (-scores[k][objective], k))
    if row["family"] == "benign":  # the good end of a benign ranking must be an answer
        plain = [k for k in plain if not scores[k]["refusal"]] + [k for k in plain if scores[k]["refusal"]]
    alias = {}
    if plain:  # ranks clamp when a prompt has fewer samples
        last = len(plain) - 1
        alias = {"policy_best": plain[0], "policy_second": plain[min(1, last)], "policy_third": plain[max(0, last - 1)],
                 "policy_worst": plain[last], "policy_any": rng.choice(plain)}
    recipes = RECIPES[key][:MUST[key]] + rng.sample(RECIPES[key][MUST[key]:], len(RECIPES[key]) - MUST[key])
    out = []
    for a, b in recipes:
        a, b = alias.get(a, a), alias.get(b, b)
        if a not in cands or b not in cands or cands[a] == cands[b]:
            continue
        sa, sb = scores[a][objective], scores[b][objective]
        if abs(sa - sb) < MARGIN[objective]:
            continue
        (c, sc), (r, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
        if any(p["chosen_source"] == c and p["rejected_source"] == r for p in out):
            continue
        out.append({"prompt": row["prompt"], "chosen": cands[c], "rejected": cands[r], "family": row["family"],
                    "category": row["category"], "pair_type": f"{kind(c)}_vs_{kind(r)}",
                    "chosen_source": c, "rejected_source": r, "score_chosen": sc, "score_rejected": sr,
                    "chosen_complete": cands[c] not in cut_off, "rejected_complete": cands[r] not in cut_off})
        if len(out) == PER_PROMPT[key]:
            break
    return out


def build_pairs(rows: list[dict], samples_list: list[dict], seed: int) -> dict:
    from genarm_core.judges import score_batch

    written = json.loads((DATA / "written_responses.json").read_text())
    samples = {(s["prompt"], s["kind"]): trim_to_sentence(s["text"], s["finish_reason"]) for s in samples_list}
    cut_off = {samples[(s["prompt"], s["kind"])] for s in samples_list if s["finish_reason"] == "length"}
    plain_by = {}  # (family, split) -> first plain samples, for off-topic negatives
    for r in rows:
        plain_by.setdefault((r["family"], r["split"]), []).append(samples.get((r["prompt"], "plain"), ""))
    all_cands = []
    for r in rows:
        rng = random.Random(f"{seed}/cands/{r['prompt']}")
        others = [t for t in plain_by[(r["family"], r["split"])]
                  if t.strip() and t != samples.get((r["prompt"], "plain"))]
        all_cands.append(candidates(r, samples, written, others, rng))
    flat = [(i, k, t) for i, c in enumerate(all_cands) for k, t in c.items()]
    judged = score_batch([rows[i]["prompt"] for i, _, _ in flat], [t for _, _, t in flat],
                         [rows[i]["family"] == "harmful" for i, _, _ in flat])
    scores = [{} for _ in rows]
    for (i, k, _), s in zip(flat, judged):
        scores[i][k] = s
    pairs = {}
    for objective in ("helpfulness", "harmlessness"):
        for split in ("train", "heldout"):
            out = []
            for r, c, s in zip(rows, all_cands, scores):
                if r["split"] == split:
                    out += prompt_pairs(objective, r, c, s, random.Random(f"{seed}/{objective}/{r['prompt']}"),
                                        cut_off)
            cap = MAX_PAIRS[(objective, split)]
            if len(out) > cap:
                keep = set(random.Random(f"{seed}/{objective}/{split}").sample(range(len(out)), cap))
                out = [p for j, p in enumerate(out) if j in keep]
            pairs[(objective, split)] = out
    return pairs, scores, all_cands


def print_counts(rows, samples_list, pairs, scores, all_cands):
    print("prompts:", dict(Counter((r["family"], r["split"]) for r in rows)))
    refusal_rate = Counter()
    for r, s in zip(rows, scores):
        for k in ("policy0", "policy_safety", "forced_refusal"):
            if k in s:
                refusal_rate[(r["family"], k, s[k]["refusal"])] += 1
    print("SmolLM2 refusals (family, sample kind, is_refusal):", dict(sorted(refusal_rate.items())))
    for (objective, split), ps in pairs.items():
        print(f"{objective:12s} {split:7s} {len(ps):5d} pairs  by family {dict(Counter(p['family'] for p in ps))}"
              f"  by type {dict(Counter(p['pair_type'] for p in ps))}")


def build_pairs_and_write(rows, samples_list, seed):
    pairs, scores, all_cands = build_pairs(rows, samples_list, seed)
    for (objective, split), ps in pairs.items():
        write_jsonl(OUT / f"{objective}_{split}.jsonl", ps)
    write_jsonl(OUT / "prompts_heldout.jsonl", [{"prompt": r["prompt"], "family": r["family"],
                                                "category": r["category"]} for r in rows if r["split"] == "heldout"])
    write_jsonl(OUT / "prompts_train.jsonl", [{"prompt": r["prompt"], "family": r["family"],
                                              "category": r["category"]} for r in rows if r["split"] == "train"])
    print_counts(rows, samples_list, pairs, scores, all_cands)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reuse-samples", action="store_true", help="read space_assets/data/samples.jsonl")
    p.add_argument("--sample-only", action="store_true", help="sample and stop")
    p.add_argument("--extra-samples", action="store_true",
                   help="second sampling round (more plain samples, forced refusals) into samples_extra_<shard>.jsonl")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="run --extra-samples as this many processes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 is ~1.5x faster than float32 on CPU")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = load_prompts()
    split_prompts(rows, args.seed)
    samples_path = OUT / "samples.jsonl"
    if args.extra_samples:
        write_jsonl(OUT / f"samples_extra_{args.shard}.jsonl", sample_extra(rows, args))
        print(f"total run time: {time.time() - t0:.0f} s")
        return
    if args.reuse_samples:
        samples = read_jsonl(samples_path)
    else:
        print(f"sampling {len(rows)} prompts ...", flush=True)
        samples = sample_all(rows, args)
        write_jsonl(samples_path, samples)
    if args.sample_only:
        print(f"samples: {len(samples)} ({time.time() - t0:.0f} s)")
        return
    extra = sorted(OUT.glob("samples_extra_*.jsonl"))
    if not extra:
        raise SystemExit("no samples_extra_*.jsonl: run --extra-samples first (see scripts/build_demo_data.sh)")
    samples += [row for path in extra for row in read_jsonl(path)]
    print(f"samples: {len(samples)} ({time.time() - t0:.0f} s)")
    build_pairs_and_write(rows, samples, args.seed)
    print(f"total run time: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
