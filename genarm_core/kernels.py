"""The few-row products of decoding, in the form measured fastest on this machine.

Decoding multiplies a handful of rows by every weight matrix, where CPU BLAS libraries behave
erratically: on one 2-core EPYC a 3-row float32 product took 2.8x a 1-row one with F.linear but
not as (W @ x.T).T, and oneDNN's prepacked weights beat both for most shapes. So each weight shape
gets, per row-count bucket, the fastest of a few exact forms (same math, different kernels), timed
once on cold weights of that shape and cached on disk per CPU, torch version, dtype and threads.
Attention for one new token likewise picks SDPA or a plain matmul-softmax-matmul. On a CPU it
runs in float32 whatever the model's dtype (backbone.py keeps the cache in float32 there):
bfloat16 batched matmuls of attention's small shapes took 0.3-0.8 ms each on that EPYC.

Batch invariance. The scheduler batches every user's rows together, so a row's result must not
depend on how many other rows share its product; otherwise a stream's tokens would depend on the
traffic. The measurement also checks, per form, that every row comes out bit-identical at every
bucket from 2 rows up (to the same row in a batch of two); where every shape has such a form (and
attention one too), the engine uses that one form at every row count and runs a single row as two
(`Tuning.invariant`). In float32 only: a bfloat16 product rounds its float32 sums to 8 bits,
which hides most differences from any check. On that EPYC a row-0 check passed every bfloat16
form; on an AVX-512 Xeon bfloat16 F.linear kept row 0 at every bucket but not rows after it, and
forms that kept every measured row gave other rows different bits in a real decode. The native
float32 kernels are invariant by construction; among the library's float32 forms it varies by
CPU (on that EPYC none was). Every form returns plain rows (row-major), so what runs after a
product sees one layout at every batch size (on a transposed view, SiLU's bits changed with it).
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
TUNING_VERSION = 8  # bump when the candidate forms change, so cached measurements are redone


def mkldnn_available(device) -> bool:
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise")


# ---- what this machine can run --------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """The product forms this device runs for one dtype, and why the others are not candidates.
    Decided once per process (capabilities()); every choice of forms starts from it."""
    device: str
    dtype: torch.dtype
    forms: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...] = ()  # (form, reason)

    def describe(self) -> str:
        out = ", ".join(self.forms)
        if self.dropped:
            out += "; not used: " + "; ".join(f"{form} ({why})" for form, why in self.dropped)
        return out


def _native():
    from . import native

    return native.load(log_stderr)


def _library_refuses(form: str, dtype) -> str:
    """Why the library itself says this form cannot run here ("" when it says it can)."""
    if form == "native":
        from . import native

        if dtype != torch.float32:
            return "the native kernels take float32"
        return "" if _native() is not None else native.why_not()
    if form != "mkldnn":
        return ""
    if not mkldnn_available("cpu"):
        return "this torch build has no oneDNN linear"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN reports no bf16 support on this CPU (it needs avx512bw/vl/dq or avx_ne_convert)"
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "oneDNN reports no fp16 support on this CPU"
    return ""


def _probe(form: str, dtype) -> str:
    """Runs the form on a tiny product at 1 and 3 rows; the reason it failed, or ""."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 16, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        x = torch.randn(3, 16, generator=g).to(dtype)
        packed = pack(w) if form == "mkldnn" else None
        expected = x.double() @ w.double().T + b.double()
        for rows in (1, 3):
            got = apply_form(form, x[:rows], w, b, packed).double()
            if got.shape != expected[:rows].shape or not torch.allclose(got, expected[:rows], rtol=0.05, atol=0.1):
                return f"probe gave wrong results at {rows} row(s)"
    except Exception as e:  # noqa: BLE001 - any failure drops the form, with its reason
        return f"probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


_CAPABILITIES: dict[tuple[str, torch.dtype], Capabilities] = {}


def capabilities(device, dtype) -> Capabilities:
    """Candidate forms of y = x W^T (+ b) on this device in this dtype: F.linear, (W @ x^T)^T,
    oneDNN prepacked weights and the project's own kernels (native.py). A form is a candidate only when the library says it is supported
    and a probe on a tiny input runs and gives the right numbers; a dropped form is logged once."""
    device_type = torch.device(device).type
    key = (device_type, dtype)
    if key in _CAPABILITIES:
        return _CAPABILITIES[key]
    if device_type != "cpu":
        caps = Capabilities(device_type, dtype, ("linear",))  # cuBLAS and friends need no help
    else:
        forms, dropped = [], []
        for form in ("linear", "wt", "mkldnn", "native"):
            why = _library_refuses(form, dtype) or _probe(form, dtype)
            if why:
                dropped.append((form, why))
                log_stderr(f"product form {form} not used for {str(dtype).replace('torch.', '')}: {why}")
            else:
                forms.append(form)
        caps = Capabilities(device_type, dtype, tuple(forms), tuple(dropped))
    _CAPABILITIES[key] = caps
    return caps


def forms_for(device, dtype) -> tuple[str, ...]:
    return capabilities(device, dtype).forms


@dataclass
class Plan:
    """The form to use per row bucket for one weight shape (or for attention), and the fastest
    of the forms whose rows do not depend on the batch's size (None: there is none)."""
    forms: dict[int, str] = field(default_factory=lambda: {BUCKETS[-1]: "linear"})
    times_us: dict[int, dict[str, float]] = field(default_factory=dict)  # measured, for the record
    invariant: str | None = None
    one_row: bool = False  # the invariant form gives a single row the same bits as in a batch

    def form(self, rows: int, invariant: bool = False) -> str:
        if invariant:
            return self.invariant
        for bucket in sorted(self.forms):
            if rows <= bucket:
                return self.forms[bucket]
        return "linear" if "linear" in self.forms.values() or not self.forms else self.forms[max(self.forms)]

    @property
    def used(self) -> set[str]:
        return set(self.forms.values()) | ({self.invariant} if self.invariant else set())


class Linear:
    """y = x W^T + b with the weight kept in the form(s) its plan uses. Rows beyond the largest
    bucket (a prefill, which runs alone) use F.linear, which is fast for many rows. invariant:
    one batch-invariant form at every row count (one row run as two unless the form gives it the
    same bits alone). quant: the weight's leading rows also as GGUF blocks (quant.py), whose
    products (native.py) are batch-invariant at any row count; the rows after them (LoRA A rows
    folded into the weight) then run with the native float32 kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan, invariant: bool = False,
                 quant=None):
        self.weight, self.bias, self.plan, self.quant = weight, bias, plan, quant
        self.out_features, self.in_features = weight.shape
        self.invariant = quant is not None or (invariant and plan.invariant is not None)
        self.packed = pack(weight) if quant is None and "mkldnn" in plan.used else None
        if quant is not None:  # the arguments of native.linear: blocks, then the float32 rows after them
            none = weight.new_empty(0)
            self._native_args = ({"q4_1": 1, "q8_0": 2}[quant.kind], quant.d, none if quant.m is None else quant.m,
                                 quant.qs, weight[quant.shape[0]:] if quant.shape[0] < weight.shape[0] else none, bias)

    def __call__(self, x: torch.Tensor, any_rows: bool = False) -> torch.Tensor:
        """any_rows: batch-invariant at every row count, beyond the largest bucket too (a ragged
        forward of prompt chunks and decode rows); else rows beyond it (a prefill) use F.linear."""
        rows = x.numel() // self.in_features
        if rows > BUCKETS[-1] and not (any_rows and self.invariant):
            return F.linear(x, self.weight, self.bias)
        if self.quant is not None:
            return self._blocks(x)
        if self.invariant and rows == 1 and not self.plan.one_row:
            two = x.expand(2, *x.shape[1:]).contiguous()  # a stride-0 view can take another kernel
            return apply_form(self.plan.invariant, two, self.weight, self.bias, self.packed)[:1]
        return apply_form(self.plan.form(rows, self.invariant), x, self.weight, self.bias, self.packed)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return _native().linear(x, *self._native_args)


def rounding_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The classic worst-case rounding error of x W^T computed in x's dtype, per output:
    in_features * eps * (|x| |W|^T). Where no batch-invariant form exists, a row's result at two
    batch sizes differs by at most twice this (two roundings of the same sums)."""
    eps = torch.finfo(x.dtype).eps
    return weight.shape[1] * eps * (x.abs().double() @ weight.abs().double().T)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def apply_form(form: str, x, weight, bias=None, packed=None) -> torch.Tensor:
    if form == "native":
        y = _native().mm_f32(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    if form == "mkldnn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if form == "wt":  # W x^T, copied back to rows: the ops after a product see one layout at every
        x2 = x.reshape(-1, x.shape[-1])  # batch size (on a transposed view, SiLU's results changed with it)
        y = weight @ x2.T if bias is None else torch.addmm(bias[:, None], weight, x2.T)  # [out, rows]
        return y.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# ---- attention of new tokens against a cache ------------------------------------------------
def attend(form: str, q, k, v, mask, scale: float) -> torch.Tensor:
    """q [R, H, Tq, D], k/v [R, KVH, Tk, D], mask [R, 1, Tq, Tk] (True = attend) -> [R, H, Tq, D].
    Grouped-query attention: head h reads key/value head h // (H / KVH)."""
    if form == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if form == "chunked":
        return _attend_chunked(q, k, v, mask, scale)
    R, H, Tq, D = q.shape
    G = H // k.shape[1]
    qg = q.reshape(R, k.shape[1], G * Tq, D)  # heads of one group share their keys
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # [R, KVH, G*Tq, Tk]
    scores = scores.view(R, k.shape[1], G, Tq, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, -1).to(v.dtype).view(R, k.shape[1], G * Tq, -1)
    return (probs @ v).view(R, H, Tq, D)


CHUNK = 64  # key positions per block of the chunked attention


def _attend_chunked(q, k, v, mask, scale) -> torch.Tensor:
    """Attention whose result for a row depends neither on the other rows nor on how many masked
    key positions follow its own: every sum runs over blocks of CHUNK positions (fixed-size
    reductions), and the blocks are added in order (cumsum), so masked blocks add exact zeros.
    The key length must be a multiple of CHUNK (the cache's capacity is)."""
    R, H, Tq, D = q.shape
    KVH, T = k.shape[1], k.shape[2]
    G, n = H // KVH, T // CHUNK
    scores = (q.reshape(R, KVH, G * Tq, D) @ k.transpose(-1, -2)).float() * scale  # [R, KVH, G*Tq, T]
    scores = scores.view(R, KVH, G, Tq, T).masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True)).view(R, KVH, G * Tq, n, CHUNK)
    total = p.sum(-1).cumsum(-1)[..., -1:]  # [R, KVH, G*Tq, 1]
    blocks = p.permute(0, 1, 3, 2, 4) @ v.view(R, KVH, n, CHUNK, D).to(p.dtype)  # [R, KVH, n, G*Tq, D]
    out = blocks.cumsum(2)[:, :, -1] / total  # [R, KVH, G*Tq, D]
    return out.to(v.dtype).view(R, H, Tq, D)


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


ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")  # caps on the ISA


def machine_key(device, dtype) -> str:
    """What measured plans depend on: the CPU, the ISA the libraries use, torch, dtype, threads."""
    if torch.device(device).type != "cpu":
        return "|".join([torch.device(device).type, torch.__version__, str(dtype)])
    caps = [f"{v}={os.environ[v]}" for v in ISA_VARIABLES if os.environ.get(v)]
    return "|".join([_cpu_name(), torch.backends.cpu.get_cpu_capability(), *caps,
                     ",".join(forms_for(device, dtype)), torch.__version__, str(dtype), str(torch.get_num_threads())])


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
    n = -(-max(buckets[-1], 2) // 2) * 2
    xs = torch.randn(n, in_f, dtype=dtype, device=device)
    invariant = set(forms) if dtype == torch.float32 else set()  # equal bits mean equal sums in float32 only
    # every row's result in a batch of two: a form is batch-invariant where every row of every bucket
    # equals it (every row, not one: in bfloat16 a single random row matched by chance, rows after it not)
    pairs = {form: torch.cat([apply_form(form, xs[i:i + 2], weights[0], None, packed[0]) for i in range(0, n, 2)])
             for form in invariant}  # [n, out_f]
    one_row = {f for f in invariant if all(torch.equal(apply_form(f, xs[i:i + 1], weights[0], None, packed[0]),
                                                       pairs[f][i:i + 1]) for i in range(min(n, 16)))}
    for b in buckets:
        x = xs[:b]
        times = {}
        for form in forms:
            def run():
                for w, p in zip(weights, packed):
                    apply_form(form, x, w, None, p)
            run()  # warm-up
            times[form] = _timed(run, passes) / copies * 1e6
            if b >= 2 and form in invariant and not torch.equal(apply_form(form, x, weights[0], None, packed[0]),
                                                                pairs[form][:b]):
                invariant.discard(form)
        plan.forms[b] = min(times, key=times.get)
        plan.times_us[b] = {k: round(v, 1) for k, v in times.items()}
    plan.invariant = _least_regret(plan.times_us, invariant)
    plan.one_row = plan.invariant in one_row
    return plan


def _least_regret(times_us: dict[int, dict[str, float]], candidates: set) -> str | None:
    """The candidate form whose worst ratio to the fastest form, over the row buckets, is lowest:
    it runs at every row count, so no bucket (one row, or many) may be much slower than it could."""
    if not candidates:
        return None
    regret = lambda f: max(t[f] / max(min(t.values()), 1e-9) for t in times_us.values())  # noqa: E731
    return min(sorted(candidates), key=regret)


def measure_blocks(out_f: int, in_f: int, kind: str, buckets=BUCKETS, passes: int = 3) -> dict[int, float]:
    """Microseconds per product on random GGUF blocks of this shape (quant.py), per row bucket."""
    from .quant import quantize

    native = _native()
    size = out_f * in_f // 32 * (24 if kind == "q4_1" else 36)
    copies = max(2, min(32, COLD_BYTES // size))
    weights = [quantize(torch.randn(out_f, in_f) * 0.02, kind) for _ in range(copies)]
    xs = torch.randn(buckets[-1], in_f)
    times = {}
    for b in buckets:
        run = lambda: [w.product(native, xs[:b]) for w in weights]  # noqa: E731
        run()
        times[b] = round(_timed(run, passes) / copies * 1e6, 1)
    return times


def measure_attention(heads: int, kv_heads: int, head_dim: int, dtype, device, context: int = 256,
                      buckets=BUCKETS, passes: int = 3) -> Plan:
    """Times SDPA and the plain form per bucket; a form is invariant when row 0's output is the same
    at every bucket and when the keys are padded with masked positions (rows of different lengths)."""
    if torch.device(device).type != "cpu":
        return Plan({b: "sdpa" for b in buckets})
    plan = Plan({})
    n = buckets[-1]
    q = torch.randn(n, heads, 1, head_dim, dtype=dtype)
    k, v = (torch.randn(n, kv_heads, context, head_dim, dtype=dtype) for _ in range(2))
    mask = torch.ones(n, 1, 1, context, dtype=torch.bool)
    scale = head_dim ** -0.5
    forms = ("sdpa", "manual", "chunked")
    invariant = set()
    for form in forms:  # row 0 has 37 keys; alone (64 positions), and among b rows with 64..context
        mask[:1] = False
        mask[:1, :, :, :37] = True
        alone = attend(form, q[:1], k[:1, :, :CHUNK], v[:1, :, :CHUNK], mask[:1, :, :, :CHUNK], scale)
        if all(torch.equal(attend(form, q[:b], k[:b, :, :T], v[:b, :, :T], mask[:b, :, :, :T], scale)[:1], alone)
               for b in buckets for T in range(CHUNK, context + 1, CHUNK)):
            invariant.add(form)
    mask[:] = True
    for b in buckets:
        times = {}
        for form in forms:
            run = lambda: [attend(form, q[:b], k[:b], v[:b], mask[:b], scale) for _ in range(4)]  # noqa: E731
            run()
            times[form] = _timed(run, passes) / 4 * 1e6
        plan.forms[b] = min(times, key=times.get)
        plan.times_us[b] = {k: round(v, 1) for k, v in times.items()}
    plan.invariant = _least_regret(plan.times_us, invariant)
    return plan


@dataclass
class Tuning:
    """Plans for every weight shape of a model, plus attention; from disk when measured before."""
    linear: dict[tuple[int, int], Plan]
    attention: Plan
    key: str = ""
    dtype: torch.dtype = torch.float32  # of the products

    @property
    def invariant(self) -> bool:
        """Every product and attention has a batch-invariant form (see the module's doc)."""
        return self.attention.invariant is not None and all(p.invariant for p in self.linear.values())

    def invariance(self) -> str:
        """Why rows do (or may not) come out independent of the batch, in words."""
        if self.key == "plain":
            return "not claimed: plain forms, nothing measured"
        if self.dtype != torch.float32:
            return (f"not claimed in {str(self.dtype).removeprefix('torch.')}: products round their float32 sums "
                    "to it, so equal bits on measured rows do not show equal sums (float32 does)")
        missing = sorted(shape for shape, p in self.linear.items() if p.invariant is None)
        reasons = [f"{len(missing)} of {len(self.linear)} product shapes have no form whose rows are bit-identical "
                   f"at every batch size here (e.g. {'x'.join(map(str, missing[0]))})"] if missing else []
        if self.attention.invariant is None:
            reasons.append("attention has no such form here")
        return "; ".join(reasons) or "every product shape and attention have a form whose rows are bit-identical " \
                                     "at every batch size here (measured)"

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
    """F.linear and SDPA everywhere, nothing measured (forms: plain, and GPUs); no batch-invariance
    claim."""
    return Tuning({s: Plan({b: "linear" for b in BUCKETS}) for s in shapes},
                  Plan({b: "sdpa" for b in BUCKETS}), key="plain")


def tune(shapes, attention: tuple[int, int, int], dtype, device, cache_dir: Path | None = None,
         max_rows: int = BUCKETS[-1], log=None) -> Tuning:
    """The plans for these weight shapes and attention (heads, kv heads, head dim): read from the
    machine's file in cache_dir, measuring (and adding) only what is not there yet."""
    if torch.device(device).type != "cpu":
        return plain_tuning(shapes, device)
    buckets = tuple(b for b in BUCKETS if b <= max(1, max_rows)) or (1,)
    source = "|".join([f"v{TUNING_VERSION}", machine_key(device, dtype), repr(buckets)])
    path = cache_dir / f"plans-{hashlib.sha256(source.encode()).hexdigest()[:16]}.json" if cache_dir else None
    known = {"machine": source, "linear": {}, "attention": {}}
    if path and path.exists():
        try:
            known = json.loads(path.read_text())
        except ValueError:
            pass  # a damaged file is measured again
    name = lambda dims: "x".join(map(str, dims))  # noqa: E731
    missing = [s for s in shapes if name(s) not in known["linear"]]
    new_attention = name(attention) not in known["attention"]
    if missing or new_attention:
        t0 = time.perf_counter()
        if log:
            log(f"measuring the fastest product forms for {len(missing)} weight shapes in {dtype} "
                "(once per machine)...")
        with torch.inference_mode():
            for s in missing:
                known["linear"][name(s)] = _plan_json(measure_linear(*s, dtype, device, buckets))
            if new_attention:  # in float32, as the cache holds it on a CPU (see backbone.Cache)
                known["attention"][name(attention)] = _plan_json(
                    measure_attention(*attention, torch.float32, device, buckets=buckets))
        if log:
            log(f"measured in {time.perf_counter() - t0:.1f} s")
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
    return Tuning({s: _plan(known["linear"][name(s)]) for s in shapes}, _plan(known["attention"][name(attention)]),
                  key=source, dtype=dtype)


def _plan_json(p: Plan) -> dict:
    return {"forms": p.forms, "times_us": p.times_us, "invariant": p.invariant, "one_row": p.one_row}


def _plan(d: dict) -> Plan:
    return Plan({int(b): f for b, f in d["forms"].items()}, {int(b): dict(v) for b, v in d["times_us"].items()},
                d.get("invariant"), d.get("one_row", False))


def log_stderr(msg: str):
    print(f"[genarm] {msg}", file=sys.stderr, flush=True)
