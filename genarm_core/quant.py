"""Weights kept in GGUF's block formats for the decode products (native.py's kernels):
Q4_1, 32 weights a block, w = d*q + m with q in 0..15; Q8_0, w = d*q with q in -128..127.

A block's d and m are float16 in the file and exact in float32, so the dequantized weight
d*q + m (computed in float32, as gguf-py and transformers do) is exactly the dense weight that
transformers loads from the same file: the products on the blocks compute the same x W^T as the
dense model, to float32 rounding. Weights from any other source can be quantized into these
formats too, which changes the model (quantize())."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

BLOCK = 32
KINDS = ("q4_1", "q8_0")


@dataclass
class QuantWeight:
    """[N, K] weights as N * K/32 blocks: scales d [N, nb] (float32), mins m [N, nb] (Q4_1 only),
    quants qs [N, nb, 16] (Q4_1: byte j holds weight j in its low nibble, j + 16 in its high) or
    [N, nb, 32] int8 (Q8_0)."""
    kind: str
    d: torch.Tensor
    m: torch.Tensor | None
    qs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.d, self.m, self.qs) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight, with gguf-py's arithmetic ((d * q) + m in float32)."""
        N, K = self.shape
        if self.kind == "q4_1":
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], -1).float()  # [N, nb, 32]
            return (self.d[..., None] * q + self.m[..., None]).view(N, K)
        return (self.qs.float() * self.d[..., None]).view(N, K)

    def rows(self, index) -> "QuantWeight":
        pick = lambda t: None if t is None else t[index].contiguous()  # noqa: E731
        return QuantWeight(self.kind, pick(self.d), pick(self.m), pick(self.qs))

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        kind = parts[0].kind
        assert all(p.kind == kind for p in parts)
        m = torch.cat([p.m for p in parts]) if kind == "q4_1" else None
        return QuantWeight(kind, torch.cat([p.d for p in parts]), m, torch.cat([p.qs for p in parts]))

    def product(self, native, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [R, K] float32 -> x W^T [R, N] (into `out`, a [R, N] view, when given)."""
        if self.kind == "q4_1":
            return native.mm_q4_1(x, self.d, self.m, self.qs, out)
        return native.mm_q8_0(x, self.d, self.qs, out)


def from_gguf_blocks(kind: str, raw: torch.Tensor) -> QuantWeight:
    """raw [N, nb * bytes per block] uint8, as the file stores a tensor's rows."""
    N = raw.shape[0]
    if kind == "q4_1":
        blocks = raw.view(N, -1, 20)
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        return QuantWeight(kind, d.contiguous(), m.contiguous(), blocks[..., 4:].contiguous())
    blocks = raw.view(N, -1, 34)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    return QuantWeight(kind, d.contiguous(), None, blocks[..., 2:].contiguous().view(torch.int8))


def quantize(weight: torch.Tensor, kind: str) -> QuantWeight:
    """Round-to-nearest quantization of a dense [N, K] weight (K a multiple of 32), with float16
    scales as GGUF stores them. This changes the model: use it only when asked for."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // BLOCK, BLOCK)
    if kind == "q4_1":
        lo, hi = w.amin(-1), w.amax(-1)
        d = ((hi - lo) / 15).half().float()
        m = lo.half().float()
        q = torch.where(d[..., None] > 0, ((w - m[..., None]) / d[..., None]).round(), torch.zeros_like(w))
        q = q.clamp(0, 15).to(torch.uint8)
        return QuantWeight(kind, d.contiguous(), m.contiguous(), (q[..., :16] | (q[..., 16:] << 4)).contiguous())
    amax = w.abs().amax(-1)
    d = (amax / 127).half().float()
    q = torch.where(d[..., None] > 0, (w / d[..., None]).round(), torch.zeros_like(w)).clamp(-127, 127)
    return QuantWeight(kind, d.contiguous(), None, q.to(torch.int8).contiguous())


# ---- reading a GGUF file's blocks under transformers' names ----------------------------------
_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
    return None


def _unpermute(rows: int, n_head: int) -> torch.Tensor:
    """The row order transformers gives q/k weights of a llama GGUF (undoing llama.cpp's rotary
    permutation), as indices into the file's rows."""
    dim = rows // n_head // 2
    return torch.arange(rows).view(n_head, dim, 2).transpose(1, 2).reshape(rows)


def read_gguf(path: Path, heads: int, kv_heads: int) -> dict[str, QuantWeight]:
    """The Q4_1 / Q8_0 tensors of a llama-family GGUF file, by transformers' parameter name."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        kind, name = t.tensor_type.name.lower(), _hf_name(t.name)
        if kind not in KINDS or name is None:
            continue
        qw = from_gguf_blocks(kind, torch.from_numpy(t.data.copy()))
        if ".q_proj." in name or ".k_proj." in name:
            qw = qw.rows(_unpermute(qw.shape[0], heads if ".q_proj." in name else kv_heads))
        out[name] = qw
    return out
