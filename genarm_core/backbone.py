"""One transformer run as several models at once: its plain weights and its LoRA ARMs.

For every sequence a backbone computes M "row models" (row j: the plain model or one LoRA
adapter). LoRA ARMs leave the layers below their first adapted layer untouched, so those layers
(the shared trunk) run once per sequence; at the trunk's top the hidden states fan out to the
M rows (row s * M + j is model j of sequence s). Every adapted module then adds all adapters'
deltas with two products per fused projection (lora.LoraGroup). The KV cache follows the same layout: one row
per sequence below the trunk, M rows above.

The layers are the HF model's own (Llama, Mistral, Qwen2, Qwen3): norms, rotary embedding and
activation are its modules and functions; the projections run through kernels.Linear (the form
measured fastest), attention through kernels.attend, with this module's cache.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import ModelLoadError
from .kernels import CHUNK, Linear, Plan, Tuning, attend
from .lora import HEAD, Adapter, LoraGroup

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RunOptions:
    shared_trunk: bool = True  # run layers below the first adapted one once per sequence
    batched_lora: bool = True  # one product per module for all adapters (False: one per adapter)
    invariant: bool = True  # batch-invariant product forms where the machine has them (kernels.py)
    native_step: bool = True  # decode steps with the native kernels where they run (native.py)


def check_config(config, what: str):
    """Refuses, before any weight is read, what the engine cannot run."""
    config = config.get_text_config()
    if config.model_type not in SUPPORTED:
        raise ModelLoadError(f"{what}: architecture '{config.model_type}' is not supported by the "
                             f"decoding engine (supported: {', '.join(SUPPORTED)})")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ModelLoadError(f"{what}: sliding-window attention layers are not supported by the engine")


def check_supported(model, what: str):
    check_config(model.config, what)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ModelLoadError(f"{what}: some weights are offloaded (device 'meta'); the engine needs "
                             "every weight on a device, e.g. a GPU with enough memory or a smaller model")


def _fuse(modules, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for several projections of the same input (plus `extra` rows: the LoRA A
    matrices folded in); the HF modules' weights become views of it, so the model keeps working
    and no memory is spent twice."""
    weight = torch.cat([m.weight.data for m in modules] + ([extra] if extra is not None else []))
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        start += n
    if all(m.bias is None for m in modules):
        return weight, None
    return weight, torch.cat([m.bias.data if m.bias is not None else weight.new_zeros(m.weight.shape[0])
                              for m in modules] + [weight.new_zeros(weight.shape[0] - start)])


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # projections that share an input, fused into one product


def _modules(layer) -> dict:
    att, mlp = layer.self_attn, layer.mlp
    return {"q_proj": att.q_proj, "k_proj": att.k_proj, "v_proj": att.v_proj, "o_proj": att.o_proj,
            "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}


def _parts(index: int, names, modules: dict, rows: list) -> list:
    """(row model j, A, B, column offset) of every adapter on these modules of layer `index`."""
    parts, offset = [], 0
    for name in names:
        for j, adapter in enumerate(rows):
            if adapter is not None and (index, name) in adapter.weights:
                parts.append((j, *adapter.weights[(index, name)], offset))
        offset += modules[name].weight.shape[0]
    return parts


PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
         "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
         "down_proj": "mlp.down_proj"}  # module -> its path in a layer (the parameter names)


def group_quant(quant: dict, index: int, names) -> "QuantWeight | None":
    """The fused projection's weight as blocks, when every module of the group has blocks of one kind."""
    from .quant import QuantWeight

    parts = [quant.get(f"model.layers.{index}.{PATHS[n]}.weight") for n in names]
    if any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
        return None
    return parts[0] if len(parts) == 1 else QuantWeight.cat(parts)


def head_quant(model, quant: dict, vocab_size: int) -> "QuantWeight | None":
    """The output head as blocks: lm_head's own, or the embedding's when the two are tied."""
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    q = quant.get("lm_head.weight") or (quant.get("model.embed_tokens.weight") if tied else None)
    return None if q is None or q.shape[0] < vocab_size else q.rows(slice(0, vocab_size))


def product_shapes(model, rows: list, vocab_size: int, batched_lora: bool = True, quant: dict | None = None
                   ) -> set[tuple[int, int]]:
    """Every (out, in) product a backbone runs in a measured form: the fused projections (with
    the folded LoRA A rows), the LoRA B products and the output head; products on blocks
    (quant) need no measuring."""
    quant = quant or {}
    shapes = set()
    for i, layer in enumerate(model.model.layers):
        modules = _modules(layer)
        for names in GROUPS.values():
            out = sum(modules[n].weight.shape[0] for n in names)
            d_in = modules[names[0]].weight.shape[1]
            K = sum(a.shape[0] for _, a, _, _ in _parts(i, names, modules, rows))
            if group_quant(quant, i, names) is None:
                shapes.add((out + K if batched_lora else out, d_in))
            if K:
                shapes.add((out, K))
    head = model.get_output_embeddings().weight
    K = sum(a.weights[(HEAD, "lm_head")][0].shape[0] for a in rows if a is not None and (HEAD, "lm_head") in a.weights)
    if head_quant(model, quant, vocab_size) is None:
        shapes.add((vocab_size, head.shape[1]))
    if K:
        shapes.add((vocab_size, K))
    return shapes


def _check_saved_base(adapter: Adapter, weights: dict[str, torch.Tensor]):
    """An adapter that carries frozen base weights (PEFT saves them for lm_head / embed_tokens)
    must carry this base's: the engine applies the LoRA matrices on the model's own weights."""
    for name, saved in adapter.saved_base.items():
        own = weights[name]
        same = saved.shape == own.shape and torch.allclose(saved.to(own.device, torch.float32), own.float(),
                                                           atol=1e-2, rtol=1e-2)
        if not same:
            raise ModelLoadError(f"ARM '{adapter.name}': adapter {adapter.folder} carries its own {name} "
                                 "weights, which differ from the base's; it was trained on another base")


def _is_silu(act) -> bool:
    """Whether an activation module computes SiLU (torch's, or transformers' SiLUActivation)."""
    x = torch.linspace(-6, 6, 25)
    with torch.no_grad():
        return type(act).__name__ in ("SiLU", "SiLUActivation") and torch.allclose(act(x), torch.nn.functional.silu(x))


class _Layer:
    def __init__(self, layer, index: int, tuning: Tuning, rows: list, options: "RunOptions", quant: dict):
        att, mlp = layer.self_attn, layer.mlp
        self.index, self.layer = index, layer
        self.device = att.q_proj.weight.device
        self.sizes = [att.q_proj.weight.shape[0], att.k_proj.weight.shape[0], att.v_proj.weight.shape[0]]
        self.head_dim = att.head_dim
        self.scale = att.scaling
        self.q_norm, self.k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
        self.rope = sys.modules[type(att).__module__].apply_rotary_pos_emb
        self.act = mlp.act_fn
        self.silu = _is_silu(mlp.act_fn) and mlp.gate_proj.weight.shape[0] % 8 == 0  # native_step fuses it
        self.heads, self.kv_heads = self.sizes[0] // self.head_dim, self.sizes[1] // self.head_dim
        self.intermediate = mlp.gate_proj.weight.shape[0]
        norm = lambda n: (n.weight.float().contiguous(), float(n.variance_epsilon))  # noqa: E731 - for native_step
        self.norms = [norm(layer.input_layernorm), norm(layer.post_attention_layernorm)]
        none = torch.empty(0)
        self.qk_norms = ((*[n.weight.float().contiguous() for n in (self.q_norm, self.k_norm)], float(self.q_norm.variance_epsilon))
                         if self.q_norm is not None else (none, none, 0.0))
        modules = _modules(layer)
        dtype = att.q_proj.weight.dtype
        invariant = options.invariant and tuning.invariant
        make = lambda w, b=None: Linear(w, b, tuning.plan(*w.shape), invariant)  # noqa: E731
        self.lora: dict[str, LoraGroup] = {}
        self.products: dict[str, Linear] = {}
        self.widths: dict[str, int] = {}
        for group, names in GROUPS.items():
            parts = _parts(index, names, modules, rows)
            width = sum(modules[n].weight.shape[0] for n in names)
            lora = LoraGroup(parts, len(rows), width, dtype, self.device, make, options.batched_lora) if parts else None
            folded = lora.A_rows if lora is not None and options.batched_lora else None
            weight, bias = _fuse([modules[n] for n in names], folded)
            blocks = group_quant(quant, index, names)
            self.products[group] = Linear(weight, bias, Plan(), quant=blocks) if blocks else make(weight, bias)
            self.widths[group] = width
            if lora is not None:
                self.lora[group] = lora

    def _project(self, group: str, x: torch.Tensor) -> torch.Tensor:
        """The group's fused product plus every adapter's LoRA delta on its rows."""
        out = self.products[group](x)
        lora = self.lora.get(group)
        if lora is None:
            return out
        if not lora.batched:
            lora.add_unbatched(out, x)
            return out
        y, u = out[..., :self.widths[group]], out[..., self.widths[group]:]
        lora.add_to(y, u)
        return y

    def native_step(self, native, h, cos, sin, slots, positions, lengths, K, V) -> torch.Tensor:
        """This layer on token rows with the native kernels (the same math as __call__, each row on
        its own): h [R, d], cos/sin [R, Dh], the rows' cache slots, positions and lengths
        (positions + 1) [R]; writes their keys and values into K/V [slots, KVH, capacity, Dh]
        before any row attends, so a prompt chunk's rows see each other (causally, by length)."""
        qkv = self._native_project(native, "qkv", native.rms_norm(h, *self.norms[0]))
        q = native.rope_store(qkv, cos, sin, K, V, slots, positions, self.heads, self.kv_heads, *self.qk_norms)
        h = self._native_project(native, "o", native.attend(q, K, V, slots, lengths, self.scale), residual=h)
        gate_up = self._native_project(native, "gate_up", native.rms_norm(h, *self.norms[1]))
        act = native.silu_mul(gate_up) if self.silu else self.act(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:]
        return self._native_project(native, "down", act, residual=h)

    def _native_project(self, native, group: str, x: torch.Tensor, residual=None) -> torch.Tensor:
        """_project in one or two native calls: the product (on blocks, or in its measured form),
        plus `residual`, plus every adapter's LoRA delta on its rows."""
        product, lora, width = self.products[group], self.lora.get(group), self.widths[group]
        if product.quant is not None:
            out = native.linear(x, *product._native_args, residual)
        else:
            out = product(x, any_rows=True)
            if residual is not None:
                out[:, :width] += residual
        if lora is None:
            return out
        if not lora.batched:
            lora.add_unbatched(out, x)
            return out
        y = out[:, :width]
        native.lora_add(y, out[:, width:], lora.native_parts, lora.Bt, lora.M)
        return y

    def __call__(self, h, cos, sin, attention) -> torch.Tensor:
        """h [R, T, d]; attention(q, k, v) -> [R, H, T, Dh] reads and writes this layer's cache."""
        R, T, _ = h.shape
        x = self.layer.input_layernorm(h)
        qkv = self._project("qkv", x)
        q, k, v = (t.view(R, T, -1, self.head_dim) for t in qkv.split(self.sizes, -1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [R, heads, T, Dh]
        q, k = self.rope(q, k, cos, sin)
        o = attention(q, k, v).transpose(1, 2).reshape(R, T, -1)
        h = h + self._project("o", o)
        x = self.layer.post_attention_layernorm(h)
        gate, up = self._project("gate_up", x).split(self.intermediate, -1)
        return h + self._project("down", self.act(gate) * up)


class Backbone:
    """A model and the row models run on it (None = the plain weights, else a LoRA Adapter)."""

    def __init__(self, model, rows: list[Adapter | None], vocab_size: int, tuner,
                 options: RunOptions = RunOptions(), name: str = "base", quant: dict | None = None):
        """tuner(shapes, (heads, kv heads, head dim)) -> kernels.Tuning for this backbone's products
        (product_shapes) and attention. quant: weights also held as GGUF blocks (quant.py), by
        parameter name; the projections and head they cover run on the blocks."""
        quant = quant or {}
        check_supported(model, name)
        self.model, self.name, self.options = model, name, options
        self.M = len(rows)
        self.vocab_size = vocab_size
        inner = model.model
        n_layers = len(inner.layers)
        adapters = [a for a in rows if a is not None]
        first = min((a.first_layer for a in adapters), default=n_layers)
        self.trunk = n_layers if self.M == 1 else (first if options.shared_trunk else 0)
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        config = model.config.get_text_config()
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        tuning = tuner(product_shapes(model, rows, vocab_size, options.batched_lora, quant),
                       (config.num_attention_heads, config.num_key_value_heads, inner.layers[0].self_attn.head_dim))
        self.invariant = options.invariant and tuning.invariant  # rows independent of the batch
        self.invariance = tuning.invariance() if options.invariant else "off in the profile (engine.batch_invariant)"
        self.attention_plan = tuning.attention
        self.forms_used = sorted({f for p in [*tuning.linear.values(), tuning.attention] for f in p.used})  # + blocks below
        dtype = inner.embed_tokens.weight.dtype
        # on a CPU attention runs in float32 (see kernels.py); elsewhere in the model's dtype
        self.cache_dtype = torch.float32 if self.device_type(inner) == "cpu" else dtype
        self.layers = [_Layer(layer, i, tuning, rows, options, quant) for i, layer in enumerate(inner.layers)]
        make = lambda w: Linear(w, None, tuning.plan(*w.shape), self.invariant)  # noqa: E731
        head = model.get_output_embeddings().weight
        for adapter in adapters:
            _check_saved_base(adapter, {"lm_head": head, "embed_tokens": self.embed.weight})
        if head.shape[0] < vocab_size:
            raise ModelLoadError(f"{name}: the model's output has {head.shape[0]} logits but the tokenizer "
                                 f"has {vocab_size} tokens")
        blocks = head_quant(model, quant, vocab_size)
        self.head = Linear(head[:vocab_size], None, Plan(), quant=blocks) if blocks else make(head[:vocab_size])
        self.quantized = sorted({q.kind for q in quant.values()}) if quant else []
        self.weights_note = ""  # how the weights are held (models.quant_weights), for the runtime report
        self.head_device = head.device
        head_parts = [(j, a.weights[(HEAD, "lm_head")][0], a.weights[(HEAD, "lm_head")][1][:vocab_size], 0)
                      for j, a in enumerate(rows) if a is not None and (HEAD, "lm_head") in a.weights]
        self.head_lora = LoraGroup(head_parts, self.M, vocab_size, head.dtype, head.device, make,
                                   batched=True) if head_parts else None  # its A product runs apart
        self.device = self.embed.weight.device
        self.native = self._native_kernels(options)
        self.final_norm = (self.norm.weight.float().contiguous(), float(getattr(self.norm, "variance_epsilon", 0.0)))

    def _native_kernels(self, options: RunOptions):
        """The native decode kernels, where they can run this backbone's decode steps (a CPU,
        float32, head dims a multiple of 8, Llama-family RMSNorms): else None (the torch path)."""
        from . import native

        layer = self.layers[0].layer
        fits = (options.native_step and self.device.type == "cpu" and self.embed.weight.dtype == torch.float32
                and self.head_dim % 8 == 0 and hasattr(layer.input_layernorm, "variance_epsilon")
                and hasattr(self.norm, "variance_epsilon"))
        return native.load() if fits else None

    @staticmethod
    def device_type(inner) -> str:
        return inner.embed_tokens.weight.device.type

    def _attend(self, form, q, k, v, mask, layer):
        """Attention in the cache's dtype; the output in the model's."""
        out = attend(form, q.to(self.cache_dtype), k, v, mask, self.layers[layer].scale)
        return out.to(q.dtype)

    # ---- one forward over all layers --------------------------------------------------------
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        """ids, positions [S, T] -> final hidden states [S*M, T, d] (rows fanned out at the trunk).
        attention(layer_index, q, k, v, rows_per_seq) does the layer's attention."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions)
        for layer in self.layers:
            if layer.index == self.trunk:
                h, cos, sin = (t.repeat_interleave(self.M, 0) for t in (h, cos, sin))
            if h.device != layer.device:  # models spread over several GPUs
                h, cos, sin = h.to(layer.device), cos.to(layer.device), sin.to(layer.device)
            m = self.M if layer.index >= self.trunk else 1
            h = layer(h, cos, sin, lambda q, k, v, i=layer.index, m=m: attention(i, q, k, v, m))
        if self.trunk >= len(self.layers):
            h = h.repeat_interleave(self.M, 0)
        return self.norm(h.to(self.norm.weight.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S*M, d] or [S*M, T, d] -> logits over the tokenizer's vocabulary."""
        hidden = hidden.to(self.head_device)
        if self.native is not None and hidden.dim() == 2:  # decode rows: each row on its own
            out = self.head(hidden, any_rows=True)
            if self.head_lora is not None:
                u = self.native.mm_f32(hidden.contiguous(), self.head_lora.A_rows)
                self.native.lora_add(out, u, self.head_lora.native_parts, self.head_lora.Bt, self.head_lora.M)
            return out
        out = self.head(hidden)
        if self.head_lora is not None:
            x = hidden if hidden.dim() == 3 else hidden[:, None]
            u = x @ self.head_lora.A_rows.T  # the head's own product stays unchanged (tied weights)
            self.head_lora.add_to(out if hidden.dim() == 3 else out[:, None], u)
        return out

    def rows_at(self, layer: int) -> int:
        return self.M if layer >= self.trunk else 1

    # ---- prefill and scoring ----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> tuple["CacheEntry", torch.Tensor]:
        """One prompt: its cache entry and the logits of its last position [M, V]."""
        T = len(ids)
        x = torch.tensor([ids], device=self.device)
        positions = torch.arange(T, device=self.device)[None]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None]
        kv = [None] * len(self.layers)

        def attention(i, q, k, v, m):
            k, v = k.to(self.cache_dtype), v.to(self.cache_dtype)
            kv[i] = (k, v)
            return self._attend("sdpa", q, k, v, causal.to(q.device), i)

        hidden = self._run(x, positions, attention)
        return CacheEntry(kv, T), self.logits(hidden[:, -1])

    @torch.inference_mode()
    def target_logprobs(self, seqs: list[list[int]], start: int) -> torch.Tensor:
        """log p(token t | < t) of every token from position `start` on, for each row model:
        [B, M, L - start] (0 past a sequence's end). One full forward without a cache."""
        from .fusion import token_logprobs

        B, L = len(seqs), max(map(len, seqs))
        ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs], device=self.device)
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        positions = torch.arange(L, device=self.device).expand(B, L)
        keys_ok = positions[:, None, None, :] < lengths[:, None, None, None]
        mask = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()[None, None] & keys_ok

        def attention(i, q, k, v, m):
            k, v = k.to(self.cache_dtype), v.to(self.cache_dtype)
            return self._attend("sdpa", q, k, v, mask.repeat_interleave(m, 0).to(q.device), i)

        hidden = self._run(ids, positions, attention)  # [B*M, L, d]
        targets = ids[:, start:].repeat_interleave(self.M, 0)  # [B*M, L - start]
        out = torch.zeros(B * self.M, L - start, device=self.device)
        for b in range(B):  # one sequence (its M rows) at a time: logits of every position are large
            rows = slice(b * self.M, (b + 1) * self.M)
            lp = token_logprobs(self.logits(hidden[rows, start - 1:L - 1])).to(self.device)  # [M, L', V]
            out[rows] = lp.gather(-1, targets[rows][..., None])[..., 0]
        valid = (positions[:, start:] < lengths[:, None]).repeat_interleave(self.M, 0)
        return (out * valid).view(B, self.M, -1)

    # ---- decoding ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_rows(self, cache: "Cache", tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     logits_at: torch.Tensor) -> torch.Tensor:
        """One ragged forward of token rows with the native kernels: decode tokens and prompt chunks
        of any sequences together, no padding. Row t is token tokens[t] of the sequence in cache
        slot slots[t] at position positions[t]; its keys and values go into the cache there (the
        caller keeps the cache's lengths). Every kernel computes each row on its own, so a row's
        result is the same whatever else runs with it, and however its prompt was cut into chunks.
        Returns the logits of the rows logits_at [n] for each row model: [n * M, V]."""
        native, M = self.native, self.M
        cache.reserve(int(positions.max()) + 1)
        h = self.embed(tokens)  # [T, d]
        cos, sin = (t[:, 0].contiguous() for t in self.rotary(h[:, None], positions[:, None]))  # [T, Dh]
        fan = lambda t: t.repeat_interleave(M, 0).contiguous()  # noqa: E731 - token rows -> model rows
        model_slots = (slots[:, None] * M + torch.arange(M, device=slots.device)).reshape(-1)
        per_rows = {1: (cos, sin, slots, positions, positions + 1),
                    M: (fan(cos), fan(sin), model_slots, fan(positions), fan(positions + 1))}
        for layer in self.layers:
            if layer.index == self.trunk:
                h = fan(h)
            i = layer.index
            h = layer.native_step(native, h, *per_rows[self.rows_at(i)], cache.k[i], cache.v[i])
        if self.trunk >= len(self.layers):
            h = fan(h)
        picked = (logits_at[:, None] * M + torch.arange(M, device=h.device)).reshape(-1)
        return self.logits(native.rms_norm(h[picked].contiguous(), *self.final_norm))

    @torch.inference_mode()
    def step(self, cache: "Cache", tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per sequence [S]; returns the next-token logits [S*M, V]."""
        if self.native is not None:
            S = tokens.shape[0]
            every = torch.arange(S, device=self.device)
            logits = self.forward_rows(cache, tokens, every, cache.lengths_t, every)
            cache.advance()
            return logits
        S = tokens.shape[0]
        positions = cache.lengths_t  # [S]: the new token's position is the number before it
        T = -(-(cache.max_length + 1) // CHUNK) * CHUNK  # a multiple of CHUNK: see kernels.attend
        cache.reserve(T)
        valid = torch.arange(T, device=self.device)[None] <= positions[:, None]  # [S, T]
        masks = {1: valid[:, None, None], self.M: valid.repeat_interleave(self.M, 0)[:, None, None]}
        rows = {m: torch.arange(S * m, device=self.device) for m in masks}
        where = {m: positions.repeat_interleave(m) for m in masks}

        def attention(i, q, k, v, m):
            K, V = cache.k[i], cache.v[i]
            K[rows[m].to(K.device), :, where[m].to(K.device)] = k[:, :, 0].to(K.dtype)
            V[rows[m].to(K.device), :, where[m].to(K.device)] = v[:, :, 0].to(V.dtype)
            return self._attend(self.attention_plan.form(q.shape[0], self.invariant), q, K[:, :, :T], V[:, :, :T],
                                masks[m].to(q.device), i)

        hidden = self._run(tokens[:, None], positions[:, None], attention)
        cache.advance()
        return self.logits(hidden[:, 0])


@dataclass
class CacheEntry:
    """One prompt's keys and values per layer ([rows, KVH, T, Dh] each) and its length."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


class Cache:
    """Keys and values of the live sequences of one backbone, in batch order, sequence-major.
    Capacity along time grows in chunks; sequences join (`append`) and leave (`keep`)."""

    CHUNK = 128

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.k: list[torch.Tensor | None] = [None] * len(backbone.layers)
        self.v: list[torch.Tensor | None] = [None] * len(backbone.layers)
        self.lengths: list[int] = []
        self.lengths_t = torch.zeros(0, dtype=torch.long, device=backbone.device)
        self.capacity = 0

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def __len__(self):
        return len(self.lengths)

    def reserve(self, T: int):
        if T <= self.capacity:
            return
        new = -(-T // self.CHUNK) * self.CHUNK
        pad = lambda t: None if t is None else torch.nn.functional.pad(t, (0, 0, 0, new - t.shape[2]))  # noqa: E731
        self.k = [pad(t) for t in self.k]
        self.v = [pad(t) for t in self.v]
        self.capacity = new

    def append(self, entries: list[CacheEntry]):
        """Adds sequences at the end of the batch."""
        if not entries:
            return
        self.reserve(max(e.length for e in entries) + 1)
        for i in range(len(self.k)):
            for store, part in ((self.k, 0), (self.v, 1)):
                new = [torch.nn.functional.pad(e.kv[i][part], (0, 0, 0, self.capacity - e.length)) for e in entries]
                store[i] = torch.cat(([store[i]] if store[i] is not None else []) + new)
        self.lengths += [e.length for e in entries]
        self.lengths_t = torch.tensor(self.lengths, device=self.backbone.device)

    def keep(self, alive: list[int]):
        """Keeps the sequences at these batch positions, in this order."""
        if len(alive) == len(self.lengths):
            return
        if not alive:
            self.__init__(self.backbone)
            return
        for i in range(len(self.k)):
            m = self.backbone.rows_at(i)
            rows = torch.tensor([s * m + j for s in alive for j in range(m)], device=self.k[i].device)
            self.k[i], self.v[i] = self.k[i][rows], self.v[i][rows]
        self.lengths = [self.lengths[s] for s in alive]
        self.lengths_t = torch.tensor(self.lengths, device=self.backbone.device)

    def advance(self):
        self.lengths = [n + 1 for n in self.lengths]
        self.lengths_t = self.lengths_t + 1

    def add_empty(self, n: int):
        """Adds n sequences with nothing cached yet (their prompts are written chunk by chunk)."""
        bb = self.backbone
        empty = lambda m, layer: torch.zeros(m, bb.kv_heads, 0, bb.head_dim, dtype=bb.cache_dtype,  # noqa: E731
                                             device=layer.device)
        entry = CacheEntry([(empty(bb.rows_at(i), layer), empty(bb.rows_at(i), layer))
                            for i, layer in enumerate(bb.layers)], 0)
        self.append([entry] * n)

    def set_lengths(self, lengths: list[int]):
        self.lengths = list(lengths)
        self.lengths_t = torch.tensor(self.lengths, device=self.backbone.device)

    def entry(self, s: int) -> CacheEntry:
        """A copy of sequence s's keys and values (a prefix-cache entry)."""
        n, bb = self.lengths[s], self.backbone
        kv = []
        for i in range(len(self.k)):
            m = bb.rows_at(i)
            kv.append((self.k[i][s * m:(s + 1) * m, :, :n].clone(), self.v[i][s * m:(s + 1) * m, :, :n].clone()))
        return CacheEntry(kv, n)

    def write(self, s: int, entry: CacheEntry):
        """Sequence s takes this entry's keys and values (its prompt, already computed)."""
        self.reserve(entry.length + 1)
        for i in range(len(self.k)):
            m = self.backbone.rows_at(i)
            self.k[i][s * m:(s + 1) * m, :, :entry.length] = entry.kv[i][0]
            self.v[i][s * m:(s + 1) * m, :, :entry.length] = entry.kv[i][1]
        self.lengths[s] = entry.length
        self.lengths_t = torch.tensor(self.lengths, device=self.backbone.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)
