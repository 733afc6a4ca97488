"""The few-row products of decoding, in the form measured fastest on this machine.

Decoding multiplies a handful of rows by every weight matrix, where CPU BLAS libraries behave
erratically: on one 2-core EPYC a 3-row float32 product took 2.8x a 1-row one with F.linear but
not as (W @ x.T).T, and oneDNN's prepacked weights beat both for most shapes. So each weight shape
gets, per row-count bucket, the fastest of a few exact forms (same math, different kernels), timed
once on cold weights of that shape and cached on disk per CPU, torch version, dtype and threads.
Attention for one new token likewise picks SDPA or a plain matmul-softmax-matmul. On a CPU it
runs in float32 whatever the model's dtype (backbone.py keeps the cache in float32 there):
bfloat16 batched matmuls of attention's small shapes took 0.3-0.8 ms each on that EPYC.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # rows per product
COLD_BYTES = 96 << 20  # weights cycled through while timing, more than a CPU cache holds
TUNING_VERSION = 3  # bump when the candidate forms change, so cached measurements are redone


def mkldnn_available(device) -> bool:
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise")


def forms_for(device, dtype) -> tuple[str, ...]:
    """Candidate forms of y = x W^T (+ b): F.linear, (W @ x^T)^T, oneDNN prepacked weights."""
    if torch.device(device).type != "cpu":
        return ("linear",)  # cuBLAS and friends need no help
    return ("linear", "wt", "mkldnn") if mkldnn_available(device) else ("linear", "wt")


@dataclass
class Plan:
    """The form to use per row bucket for one weight shape (or for attention)."""
    forms: dict[int, str] = field(default_factory=lambda: {BUCKETS[-1]: "linear"})
    times_us: dict[int, dict[str, float]] = field(default_factory=dict)  # measured, for the record

    def form(self, rows: int) -> str:
        for bucket in sorted(self.forms):
            if rows <= bucket:
                return self.forms[bucket]
        return "linear" if "linear" in self.forms.values() or not self.forms else self.forms[max(self.forms)]

    @property
    def used(self) -> set[str]:
        return set(self.forms.values())


class Linear:
    """y = x W^T + b with the weight kept in the form(s) its plan uses. Rows beyond the largest
    bucket (prefill) use F.linear, which is fast for many rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan):
        self.weight, self.bias, self.plan = weight, bias, plan
        self.out_features, self.in_features = weight.shape
        self.packed = pack(weight) if "mkldnn" in plan.used else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        form = self.plan.form(rows) if rows <= BUCKETS[-1] else "linear"
        return apply_form(form, x, self.weight, self.bias, self.packed)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def apply_form(form: str, x, weight, bias=None, packed=None) -> torch.Tensor:
    if form == "mkldnn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if form == "wt":
        x2 = x.reshape(-1, x.shape[-1])
        y = (weight @ x2.T).T if bias is None else torch.addmm(bias[:, None], weight, x2.T).T
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# ---- attention of new tokens against a cache ------------------------------------------------
def attend(form: str, q, k, v, mask, scale: float) -> torch.Tensor:
    """q [R, H, Tq, D], k/v [R, KVH, Tk, D], mask [R, 1, Tq, Tk] (True = attend) -> [R, H, Tq, D].
    Grouped-query attention: head h reads key/value head h // (H / KVH)."""
    if form == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    R, H, Tq, D = q.shape
    G = H // k.shape[1]
    qg = q.reshape(R, k.shape[1], G * Tq, D)  # heads of one group share their keys
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # [R, KVH, G*Tq, Tk]
    scores = scores.view(R, k.shape[1], G, Tq, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, -1).to(v.dtype).view(R, k.shape[1], G * Tq, -1)
    return (probs @ v).view(R, H, Tq, D)


# ---- measuring ------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_key(device, dtype) -> str:
    capability = torch.backends.cpu.get_cpu_capability() if torch.device(device).type == "cpu" else ""
    return "|".join([_cpu_name(), capability, torch.__version__, str(dtype), str(torch.get_num_threads())])


def _timed(fn, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_linear(out_f: int, in_f: int, dtype, device, buckets=BUCKETS, passes: int = 3) -> Plan:
    """Times each form per bucket on enough random weights of this shape to defeat the caches."""
    forms = forms_for(device, dtype)
    if len(forms) == 1:
        return Plan({b: forms[0] for b in buckets})
    size = out_f * in_f * torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(32, COLD_BYTES // size))
    weights = [torch.randn(out_f, in_f, dtype=dtype, device=device) * 0.02 for _ in range(copies)]
    packed = [pack(w) for w in weights] if "mkldnn" in forms else [None] * copies
    plan = Plan({})
    for b in buckets:
        x = torch.randn(b, in_f, dtype=dtype, device=device)
        times = {}
        for form in forms:
            def run():
                for w, p in zip(weights, packed):
                    apply_form(form, x, w, None, p)
            run()  # warm-up
            times[form] = _timed(run, passes) / copies * 1e6
        plan.forms[b] = min(times, key=times.get)
        plan.times_us[b] = {k: round(v, 1) for k, v in times.items()}
    return plan


def measure_attention(heads: int, kv_heads: int, head_dim: int, dtype, device, context: int = 256,
                      buckets=BUCKETS, passes: int = 3) -> Plan:
    if torch.device(device).type != "cpu":
        return Plan({b: "sdpa" for b in buckets})
    plan = Plan({})
    for b in buckets:
        q = torch.randn(b, heads, 1, head_dim, dtype=dtype)
        k, v = (torch.randn(b, kv_heads, context, head_dim, dtype=dtype) for _ in range(2))
        mask = torch.ones(b, 1, 1, context, dtype=torch.bool)
        times = {}
        for form in ("sdpa", "manual"):
            run = lambda: [attend(form, q, k, v, mask, head_dim ** -0.5) for _ in range(4)]  # noqa: E731
            run()
            times[form] = _timed(run, passes) / 4 * 1e6
        plan.forms[b] = min(times, key=times.get)
        plan.times_us[b] = {k: round(v, 1) for k, v in times.items()}
    return plan


@dataclass
class Tuning:
    """Plans for every weight shape of a model, plus attention; from disk when measured before."""
    linear: dict[tuple[int, int], Plan]
    attention: Plan
    key: str = ""

    def plan(self, out_f: int, in_f: int) -> Plan:
        return self.linear[(out_f, in_f)]

    def step_us(self, shapes: dict[tuple[int, int], int], rows: int) -> float:
        """Estimated time of one pass over `shapes` ({shape: how many}) at `rows` rows."""
        total = 0.0
        for shape, count in shapes.items():
            plan = self.linear[shape]
            bucket = next((b for b in sorted(plan.times_us) if rows <= b), None)
            if bucket is None:
                return float("nan")
            total += count * plan.times_us[bucket][plan.forms[bucket]]
        return total


def plain_tuning(shapes, device) -> Tuning:
    return Tuning({s: Plan({b: "linear" for b in BUCKETS}) for s in shapes},
                  Plan({b: "sdpa" for b in BUCKETS}), key="plain")


def tune(shapes, attention: tuple[int, int, int], dtype, device, cache_dir: Path | None = None,
         max_rows: int = BUCKETS[-1], log=None) -> Tuning:
    """Measures (or reads from cache_dir) the plans for the given weight shapes."""
    buckets = tuple(b for b in BUCKETS if b <= max(1, max_rows)) or (1,)
    key_src = "|".join([f"v{TUNING_VERSION}", machine_key(device, dtype), repr(sorted(shapes)), repr(attention),
                        repr(buckets)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir / f"tuning-{key}.json" if cache_dir else None
    if path and path.exists():
        try:
            return _from_json(json.loads(path.read_text()), key)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again
    if torch.device(device).type != "cpu":
        return plain_tuning(shapes, device)
    t0 = time.perf_counter()
    if log:
        log(f"measuring the fastest product forms for {len(shapes)} weight shapes in {dtype} "
            f"(once per machine)...")
    with torch.inference_mode():
        linear = {s: measure_linear(*s, dtype, device, buckets) for s in shapes}
        att = measure_attention(*attention, torch.float32, device, buckets=buckets)  # see backbone.Cache
    tuning = Tuning(linear, att, key)
    if log:
        log(f"measured in {time.perf_counter() - t0:.1f} s")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_to_json(tuning, key_src), indent=1))
        tmp.replace(path)
    return tuning


def _to_json(t: Tuning, source: str) -> dict:
    plan = lambda p: {"forms": p.forms, "times_us": p.times_us}  # noqa: E731
    return {"machine": source, "linear": [[list(s), plan(p)] for s, p in t.linear.items()],
            "attention": plan(t.attention)}


def _from_json(d: dict, key: str) -> Tuning:
    def plan(p):
        return Plan({int(b): f for b, f in p["forms"].items()},
                    {int(b): dict(v) for b, v in p["times_us"].items()})
    return Tuning({tuple(s): plan(p) for s, p in d["linear"]}, plan(d["attention"]), key)


def log_stderr(msg: str):
    print(f"[genarm] {msg}", file=sys.stderr, flush=True)
