"""One product y = x W^T on 4-bit weights, per row count, in each way this machine offers: the
project's native kernel on Q4_1 blocks (exact float32 over the dequantized weights), torch's
`aten._weight_int4pack_mm_for_cpu` (group size 32) with float32 and with bfloat16 activations,
the native dense float32 kernel and F.linear on the dequantized weights. Prints ms and each
one's time against the native Q4_1 kernel, and the largest error against float32 x W_dq^T.

    python scripts/bench_products.py [--rows 1 3 8 32]

Each product reuses one weight, which stays in the CPU's caches where it fits (a model's 30
layers do not): for a whole decode step, see bench_decode.py.

Q4_1 stores w = d*q + m (q in 0..15); torch's int4 form is w = (q - 8) * scale + zero, so
scale = d and zero = m + 8 d (rounded to the activations' dtype: bfloat16 changes the weights).
"""
import argparse

import torch
import torch.nn.functional as F

from genarm_core import native
from genarm_core.kernels import _cpu_name, _timed
from genarm_core.quant import quantize

SHAPES = [(2304, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: gate/up fused, down, the head


def best_of(fn, passes: int = 7) -> float:
    """Seconds, the best of `passes` runs after one warm-up (kernels' own timer)."""
    fn()
    return _timed(fn, passes)


def ways(q, w_dq: torch.Tensor, kernels) -> dict:
    """name -> (dtype of x, product function)."""
    N, K = q.shape
    codes = torch.cat([q.qs & 0x0F, q.qs >> 4], -1).view(N, K).to(torch.int32)  # [N, K], 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.stack([q.d.T, (q.m + 8 * q.d).T], -1).contiguous()  # [K/32, N, 2]
    out = {"native Q4_1": (torch.float32, lambda x: q.product(kernels, x))}
    for dt, name in ((torch.float32, "int4pack f32"), (torch.bfloat16, "int4pack bf16")):
        sz = scales_zeros.to(dt)
        out[name] = (dt, lambda x, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz))
    out["native f32 dense"] = (torch.float32, lambda x: kernels.mm_f32(x, w_dq, None, None))
    out["F.linear dense"] = (torch.float32, lambda x: F.linear(x, w_dq))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 3, 8, 32])
    args = ap.parse_args()
    kernels = native.load()
    if kernels is None:
        raise SystemExit(f"native kernels not available: {native.why_not()}")
    print(f"CPU: {_cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| weight | way | max error | " + " | ".join(f"{r} rows: ms (vs native Q4_1)" for r in args.rows) + " |")
    print("|---|---|---|" + "---|" * len(args.rows))
    with torch.inference_mode():
        for N, K in SHAPES:
            q = quantize(torch.randn(N, K) * 0.02, "q4_1")
            w_dq = q.dequantize().contiguous()
            x0 = torch.randn(3, K)
            times = {}
            for name, (dt, fn) in ways(q, w_dq, kernels).items():
                err = (fn(x0.to(dt)).float() - x0.to(dt).float() @ w_dq.T).abs().max().item()
                times[name] = [best_of(lambda: fn(x)) for x in (torch.randn(r, K).to(dt) for r in args.rows)]
                cells = " | ".join(f"{t * 1e3:.3f} ({t / ref:.2f}x)" for t, ref in zip(times[name], times["native Q4_1"]))
                print(f"| {N}x{K} | {name} | {err:.1e} | {cells} |")


if __name__ == "__main__":
    main()
