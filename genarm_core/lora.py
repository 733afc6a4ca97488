"""LoRA adapters read straight from PEFT folders and stacked per module, so that the rows of
every ARM on one backbone get their deltas from one batched product per module.

A PEFT LoRA layer computes  y = W x + scale * B (A x)  with A: [r, in], B: [out, r] and
scale = alpha / r (alpha / sqrt(r) with rsLoRA). Training still goes through PEFT (train.py);
the folders on disk stay standard PEFT adapters.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_HEAD_KEY = re.compile(r"(?:^|\.)lm_head\.lora_([AB])(?:\.[^.]+)?\.weight$")
# PEFT saves the frozen weights of an adapted lm_head / embed_tokens next to its LoRA
_SAVED_BASE = re.compile(r"(?:^|\.)(lm_head|embed_tokens)\.base_layer\.weight$")
HEAD = -1  # the layer index under which an adapter's LoRA on the output head (lm_head) is kept


@dataclass
class Adapter:
    """One LoRA adapter: per (layer, module) its A [r, in] and B [out, r] matrices, B scaled;
    (HEAD, "lm_head") for the output head."""
    name: str
    folder: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    num_layers: int
    saved_base: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen weights PEFT kept

    @property
    def first_layer(self) -> int:
        """The lowest adapted layer (num_layers when only the output head is adapted)."""
        return min((layer for layer, _ in self.weights if layer != HEAD), default=self.num_layers)


def _refuse(name: str, folder: Path, what: str):
    raise ModelLoadError(f"ARM '{name}': adapter {folder} {what}; the engine batches plain LoRA "
                         f"on {', '.join(MODULES)} and lm_head only")


def read_adapter(folder, name: str, num_layers: int) -> Adapter:
    """Reads adapter_config.json and adapter_model.safetensors; refuses what it cannot batch."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise ModelLoadError(f"ARM '{name}': no LoRA adapter at {folder} "
                             "(expected adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path}: not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        _refuse(name, folder, f"is a {config.get('peft_type')!r} adapter, not LORA")
    for key, off in [("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False), ("lora_bias", False)]:
        if config.get(key, off) not in (off, None):
            _refuse(name, folder, f"sets {key}={config[key]!r}")
    for key in ("modules_to_save", "alpha_pattern", "trainable_token_indices"):
        if config.get(key):
            _refuse(name, folder, f"sets {key}")
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    tensors = load_file(str(weights_path))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    saved_base = {}
    for key, t in tensors.items():
        saved = _SAVED_BASE.search(key)
        if saved:
            saved_base[saved.group(1)] = t
            continue
        head = _HEAD_KEY.search(key)
        if head:
            pairs.setdefault((HEAD, "lm_head"), {})[head.group(1)] = t
            continue
        m = _KEY.search(key)
        if not m or m.group(2) not in MODULES:
            _refuse(name, folder, f"holds {key}")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ModelLoadError(f"ARM '{name}': adapter {folder} adapts layer {layer}, but the model "
                                 f"has {num_layers} layers")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t
    if not pairs:
        raise ModelLoadError(f"ARM '{name}': adapter {folder} holds no LoRA weights")
    weights = {}
    for where, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ModelLoadError(f"ARM '{name}': adapter {folder} has mismatched lora_A/lora_B at "
                                 f"layer {where[0]} {where[1]}")
        r = ab["A"].shape[0]
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        weights[where] = (ab["A"].float(), ab["B"].float() * scale)
    return Adapter(name=name, folder=folder, weights=weights, num_layers=num_layers, saved_base=saved_base)


class LoraGroup:
    """All adapters' LoRA on the projections that share one input (q/k/v, gate/up, o, down, or the
    output head), for the rows of a step, with one extra product whatever the number of adapters.

    Rows are laid out sequence-major: row s * M + j is model j of sequence s. Every (adapter,
    module) part contributes r columns to A_cat [in, K] and a block of B_cat [K, out] at the
    module's columns of the fused output. A_cat is folded into the base product (the caller
    appends `A_rows` to its weight, so x @ [W; A_cat^T]^T gives the output and u = x A_cat at
    once); then delta = (u * mask) @ B_cat, where `mask` [M, K] keeps for row model j only its own
    adapter's columns, so the plain rows get exactly zero. The products run in the model's dtype.

    batched=False applies each part to its own rows with its own float32 products (PEFT's way),
    to measure what batching saves; nothing is folded into the base product then.
    """

    def __init__(self, parts: list[tuple[int, torch.Tensor, torch.Tensor, int]], M: int, out_total: int,
                 dtype, device, make_linear, batched: bool = True):
        # parts: (row model j, A [r, in], B [out_m, r] with the scale folded in, column offset)
        K = sum(a.shape[0] for _, a, _, _ in parts)
        A = torch.zeros(K, parts[0][1].shape[1])
        B = torch.zeros(out_total, K)
        mask = torch.zeros(M, K)
        k = 0
        for j, a, b, offset in parts:
            r = a.shape[0]
            A[k:k + r] = a
            B[offset:offset + b.shape[0], k:k + r] = b
            mask[j, k:k + r] = 1.0
            k += r
        self.M, self.K, self.batched = M, K, batched
        self.A_rows = A.to(device, dtype)  # [K, in]
        self.B = make_linear(B.to(device, dtype))  # a product with weight [out, K]
        self.mask = mask.to(device, dtype)
        self.parts = [(j, a.t().to(device), b.t().to(device), offset) for j, a, b, offset in parts]
        # for native.lora_add: (row model, first column of u, rank, first output column, outputs) per part
        starts = [0, *torch.cumsum(torch.tensor([a.shape[0] for _, a, _, _ in parts]), 0).tolist()]
        self.native_parts = torch.tensor([[j, k, a.shape[0], offset, b.shape[0]]
                                          for (j, a, b, offset), k in zip(parts, starts)], dtype=torch.long)
        self.Bt = B.t().contiguous().to(device, dtype)  # [K, out]

    def add_to(self, y: torch.Tensor, u: torch.Tensor):
        """y [S*M, (T,) out] += (u * mask) @ B_cat, in place; u [S*M, (T,) K] = x A_cat."""
        R, K = u.shape[0], u.shape[-1]
        v = (u.reshape(R // self.M, self.M, -1, K) * self.mask[None, :, None, :]).view(u.shape)
        y += self.B(v)

    def add_unbatched(self, y: torch.Tensor, x: torch.Tensor):
        """y [S*M, (T,) out] += the LoRA deltas of x [S*M, (T,) in], one adapter and module at a time."""
        if x.dim() == 2:
            x, y = x[:, None], y[:, None]
        R, T, d_in = x.shape
        S = R // self.M
        for j, a, b, offset in self.parts:
            xs = x.view(S, self.M, T, d_in)[:, j].float()
            ys = y.view(S, self.M, T, -1)[:, j, :, offset:offset + b.shape[1]]
            ys += xs @ a @ b
