"""The fused decoding engine.

Every token: one forward of the shared backbone over all rows (the base and each LoRA ARM, for
every pane, as one PEFT mixed-adapter batch), one forward per standalone ARM, then the GenARM
fusion and the sampler (see fusion.py). Weights are read from the panes at every step, so they
can change while a stream runs. One host sync per token: the chosen ids and their log-probs.
"""
from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from . import fusion
from .config import load_config
from .detokenize import IncrementalDetokenizer, StopStringFilter
from .models import LoadedModels, load_models
from .prompts import prompt_ids, prompt_is_empty, response_ids

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class RequestError(ValueError):
    """A bad request: unknown ARM, bad weight, empty or oversized prompt, bad option."""


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: int = 128
    seed: int = 0
    normalised: bool = False  # divide the fused score by (1 + sum of weights)
    stop: tuple[str, ...] = ()

    def validated(self) -> "SamplingOptions":
        checks = [
            (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
             and self.temperature >= 0, "temperature", "a finite number >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
             "an integer >= 1"),
            (isinstance(self.seed, int), "seed", "an integer"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise RequestError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        return replace(self, stop=tuple(self.stop))


class Pane:
    """One weight setting. `set_weights` may be called from any thread while a stream runs;
    the next token uses the new values (the dict is replaced whole, never mutated). Validate
    user input with Engine.check_weights first; ARMs not named have weight 0."""

    def __init__(self, weights: dict[str, float], label: str = ""):
        self.weights = dict(weights)
        self.label = label

    def set_weights(self, weights: dict[str, float]):
        self.weights = dict(weights)


@dataclass
class TokenEvent:
    prompt: int  # index of the prompt in the request
    pane: int  # index of the pane (weight setting)
    step: int
    token_id: int
    text: str  # the text this token adds (may be "" while a character or stop string is pending)
    logprob_base: float  # log p of the chosen token under each model and the fused distribution
    logprob_arms: dict[str, float]
    logprob_fused: float
    weights: dict[str, float]  # the weights this token was drawn with
    finish_reason: str | None = None  # "eos", "stop", "length" or "cancelled" on a pane's last event

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs_base: list[float] = field(default_factory=list)
    logprobs_arms: dict[str, list[float]] = field(default_factory=dict)
    logprobs_fused: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent):
        self.text += event.text
        self.finish_reason = event.finish_reason
        if event.token_id < 0:
            return
        self.token_ids.append(event.token_id)
        self.logprobs_base.append(event.logprob_base)
        for name, lp in event.logprob_arms.items():
            self.logprobs_arms.setdefault(name, []).append(lp)
        self.logprobs_fused.append(event.logprob_fused)

    def rewards(self, betas: dict[str, float]) -> dict[str, float]:
        """Each ARM's trajectory reward beta * sum_t log pi_r(y_t | x, y_<t) of this answer."""
        return {n: betas[n] * sum(lps) for n, lps in self.logprobs_arms.items()}


def adapter_rows(lora: list[str], n: int) -> dict:
    """PEFT's mixed-batch argument for n sequences: the base rows, then each adapter's rows."""
    return {"adapter_names": [name for name in [BASE_ROW, *lora] for _ in range(n)]} if lora else {}


def repeat_rows(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return t.repeat(times, 1) if t is not None else None


class _Batch:
    """Decoding state of S sequences (prompt x pane) across the backbone and standalone ARMs.

    Backbone rows are grouped by model: row j * S + s is model j (0 = base, then the LoRA ARMs)
    for sequence s, so PEFT's per-adapter split takes contiguous slices.
    """

    def __init__(self, models: LoadedModels, prompts: list[list[int]], seq_prompt: list[int]):
        self.m = models
        self.lora = models.lora_arms
        self.M = 1 + len(self.lora)
        self.seq_prompt = seq_prompt
        self.caches: dict[str, DynamicCache] = {}  # filled by prefill
        lengths = [len(p) for p in prompts]
        self.padded = len(set(lengths)) > 1
        width = max(lengths)
        dev = models.device
        pad = models.tokenizer.pad_token_id
        self.prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        self.prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        self.seq_index = torch.tensor(seq_prompt, device=dev)
        self.positions = torch.tensor([lengths[p] for p in seq_prompt], device=dev)  # next position per seq
        self.mask = self.prompt_mask[self.seq_index] if self.padded else None  # [S, L]

    def _forward(self, model, cache, ids, mask, positions, extra):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :self.m.vocab_size]

    @torch.inference_mode()
    def prefill(self, prefix_cache: "PrefixCache | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs each distinct prompt once per model, then copies the caches out to every pane.
        A single prompt seen recently is taken from `prefix_cache` (its KV caches do not depend
        on the weights, so a slider release restarts without re-reading the prompt)."""
        P, S, M = self.prompt_ids.shape[0], len(self.seq_prompt), self.M
        key = tuple(self.prompt_ids[0].tolist()) if P == 1 and prefix_cache is not None else None
        hit = prefix_cache.get(key) if key else None
        if hit is None:
            caches, logits = self._run_prompts()
            if key:
                prefix_cache.put(key, (caches, logits))
        else:
            caches, logits = hit
        expand = torch.cat([j * P + self.seq_index for j in range(M)])
        self.caches["backbone"] = caches["backbone"]
        self.caches["backbone"].batch_select_indices(expand)
        standalone = []
        for name in self.m.standalone:
            self.caches[name] = caches[name]
            self.caches[name].batch_select_indices(self.seq_index)
            standalone.append(fusion.token_logprobs(logits[name][self.seq_index]))
        lp = fusion.token_logprobs(logits["backbone"][expand]).view(M, S, -1)
        return self._split(lp, standalone)

    def _run_prompts(self):
        """Fresh caches and last-position logits of every model over the distinct prompts."""
        P, M = self.prompt_ids.shape[0], self.M
        positions = (self.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        mask = self.prompt_mask if self.padded else None
        caches = {name: DynamicCache() for name in ["backbone", *self.m.standalone]}
        logits = {"backbone": self._forward(self.m.backbone, caches["backbone"], repeat_rows(self.prompt_ids, M),
                                            repeat_rows(mask, M), repeat_rows(positions, M),
                                            adapter_rows(self.lora, P))}
        for name, model in self.m.standalone.items():
            logits[name] = self._forward(model, caches[name], self.prompt_ids, mask, positions, {})
        return caches, logits

    def _split(self, backbone_lp, standalone_lp):
        """Base log-probs [S, V] and ARM log-probs [S, N, V] in the profile's ARM order."""
        dev = self.m.device  # with device_map="auto" the logits may come out on another GPU
        backbone_lp = backbone_lp.to(dev)
        by_name = dict(zip(self.lora, backbone_lp[1:]))
        by_name.update((n, lp.to(dev)) for n, lp in zip(self.m.standalone, standalone_lp))
        names = self.m.arm_names
        base = backbone_lp[0]
        arms = torch.stack([by_name[n] for n in names], 1) if names else base.new_zeros(base.shape[0], 0, base.shape[1])
        return base, arms

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor):
        """Feeds one new token per sequence; returns the next base and ARM log-probs."""
        S, M = tokens.shape[0], self.M
        ids = tokens.view(S, 1)
        positions = self.positions.view(S, 1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(S, 1)], 1)
        logits = self._forward(self.m.backbone, self.caches["backbone"], repeat_rows(ids, M),
                               repeat_rows(self.mask, M), repeat_rows(positions, M), adapter_rows(self.lora, S))
        standalone = [fusion.token_logprobs(self._forward(model, self.caches[name], ids, self.mask,
                                                          positions, {}))
                      for name, model in self.m.standalone.items()]
        self.positions = self.positions + 1
        return self._split(fusion.token_logprobs(logits).view(M, S, -1), standalone)

    @torch.inference_mode()
    def keep(self, alive: torch.Tensor):
        """Drops finished sequences (alive: indices into the current sequences)."""
        S = self.positions.shape[0]
        self.caches["backbone"].batch_select_indices(torch.cat([j * S + alive for j in range(self.M)]))
        for name in self.m.standalone:
            self.caches[name].batch_select_indices(alive)
        self.positions = self.positions[alive]
        if self.mask is not None:
            self.mask = self.mask[alive]

    def free(self):
        self.caches = {}


class PrefixCache:
    """The last few prompts' KV caches and logits, keyed by token ids. Entries are copied on
    the way in and out, so decoding never alters them."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0

    def get(self, key):
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return copy.deepcopy(self.entries[key])

    def put(self, key, value):
        self.entries[key] = copy.deepcopy(value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class Stream:
    """An iterator of steps; each step is a list of TokenEvents, one per pane still running.
    `cancel()` (from any thread) ends it before the next forward pass and frees its caches."""

    def __init__(self, engine: "Engine", prompts, panes: list[Pane], options: SamplingOptions):
        self._cancel = threading.Event()
        self.batch: _Batch | None = None
        self.panes = panes
        self._gen = engine._run(prompts, panes, options, self)

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenEvent]:
        return next(self._gen)

    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self):
        self._gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Engine:
    def __init__(self, models: LoadedModels):
        self.models = models
        self.profile = models.profile
        self.tokenizer = models.tokenizer
        self.arm_names = models.arm_names
        self._lock = threading.Lock()  # PEFT's adapter_names hooks are not thread-safe
        self.prefix_cache = PrefixCache()  # used under the lock

    @classmethod
    def from_profile(cls, name: str | None = None, config_path=None) -> "Engine":
        return cls(load_models(load_config(config_path).profile(name)))

    # ---- validation -------------------------------------------------------------------------
    def check_weights(self, weights: dict | None, normalised: bool = False) -> dict[str, float]:
        """Unknown names, non-numbers, NaN and values outside the ARM's range are refused;
        ARMs not named get weight 0 (off)."""
        weights = dict(weights or {})
        unknown = set(weights) - set(self.arm_names)
        if unknown:
            raise RequestError(f"unknown ARM(s) {', '.join(sorted(unknown))}; this profile's ARMs: "
                               f"{', '.join(self.arm_names) or 'none'}")
        out = {}
        for arm in self.profile.arms:
            w = weights.get(arm.name, 0.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise RequestError(f"weight of '{arm.name}': expected a number, got {w!r}")
            if not math.isfinite(w):
                raise RequestError(f"weight of '{arm.name}': expected a finite number, got {w}")
            if not arm.weight_min <= w <= arm.weight_max:
                raise RequestError(f"weight of '{arm.name}': {w} is outside its range "
                                   f"[{arm.weight_min}, {arm.weight_max}]")
            out[arm.name] = float(w)
        if normalised and 1.0 + sum(out.values()) <= 0:
            raise RequestError("normalised mode needs 1 + the sum of the weights to be > 0, "
                               f"got {1.0 + sum(out.values())}")
        return out

    def encode(self, prompt, max_new_tokens: int = 0) -> list[int]:
        if not isinstance(prompt, (str, list)) or prompt_is_empty(prompt):
            raise RequestError("prompt is empty")
        ids = prompt_ids(self.tokenizer, prompt, self.profile.chat_template, self.profile.system_prompt)
        limit = self.profile.max_prompt_tokens
        if limit and len(ids) > limit:
            raise RequestError(f"prompt is {len(ids)} tokens; this profile accepts at most {limit}")
        context = self.models.context_length
        if len(ids) + max_new_tokens > context:
            raise RequestError(f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                               f"exceeds the model's context of {context} tokens")
        return ids

    # ---- decoding ---------------------------------------------------------------------------
    def stream(self, prompt, panes, options: SamplingOptions | None = None) -> Stream:
        """Streams one prompt under several panes (weight settings) in one batch. The panes share
        their random draws, so panes with equal weights give equal text."""
        options = (options or SamplingOptions()).validated()
        panes = [p if isinstance(p, Pane) else Pane(p) for p in panes]
        if not panes:
            raise RequestError("at least one pane (weight setting) is needed")
        for p in panes:
            p.set_weights(self.check_weights(p.weights, options.normalised))
        return Stream(self, [self.encode(prompt, options.max_new_tokens)], panes, options)

    def generate(self, prompts, weights=None, options: SamplingOptions | None = None):
        """One-shot batched generation. weights: a dict (one setting: returns a Completion per
        prompt) or a list of dicts (panes: returns a list of Completions per prompt)."""
        options = (options or SamplingOptions()).validated()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                               and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        many = isinstance(weights, (list, tuple))
        panes = [Pane(self.check_weights(w, options.normalised)) for w in (weights if many else [weights])]
        encoded = [self.encode(p, options.max_new_tokens) for p in prompts]
        results = [[Completion() for _ in panes] for _ in prompts]
        for step in Stream(self, encoded, panes, options):
            for ev in step:
                results[ev.prompt][ev.pane].add(ev)
        results = results if many else [r[0] for r in results]
        return results[0] if single else results

    def _run(self, prompts: list[list[int]], panes: list[Pane], options: SamplingOptions, stream: Stream):
        m = self.models
        seqs = [(p, k) for p in range(len(prompts)) for k in range(len(panes))]
        S = len(seqs)
        # one generator per prompt: a prompt's samples do not depend on what else is in the batch
        generators = [torch.Generator(m.device).manual_seed(options.seed) for _ in prompts]
        detoks = [IncrementalDetokenizer(self.tokenizer) for _ in seqs]
        stops = [StopStringFilter(options.stop) for _ in seqs]
        alive = list(range(S))  # sequence numbers still running, in batch order
        prompt_of = torch.tensor([p for p, _ in seqs], device=m.device)
        last_weights, w = None, None
        eos = torch.tensor(m.eos_ids or [-1], device=m.device)
        try:
            batch = stream.batch = _Batch(m, prompts, [p for p, _ in seqs])
            with self._lock:
                base_lp, arm_lp = batch.prefill(self.prefix_cache)
            for step in range(options.max_new_tokens):
                if stream.cancelled:
                    yield [self._final_event(seqs[s], step, "cancelled", panes) for s in alive]
                    return
                weights = [panes[seqs[s][1]].weights for s in alive]
                if weights != last_weights:  # copy weights to the device only when they change
                    w = torch.tensor([[ws.get(n, 0.0) for n in self.arm_names] for ws in weights], device=m.device)
                    last_weights = weights
                tokens, host = self._choose(base_lp, arm_lp, w, options, generators, prompt_of, eos)
                events, finished = [], []
                for row, s in enumerate(alive):
                    token, lp_base, *lp_arms, lp_fused, is_eos = host[row]
                    token = int(token)
                    if is_eos:
                        text, reason = stops[s].push(detoks[s].flush()) + stops[s].flush(), "eos"
                    else:
                        text = stops[s].push(detoks[s].push(token))
                        reason = "stop" if stops[s].stopped else None
                        if reason is None and step == options.max_new_tokens - 1:
                            text += stops[s].push(detoks[s].flush()) + stops[s].flush()
                            reason = "length"
                    prompt, pane = seqs[s]
                    events.append(TokenEvent(prompt, pane, step, token, text, lp_base,
                                             dict(zip(self.arm_names, lp_arms)), lp_fused,
                                             weights[row], reason))
                    if reason:
                        finished.append(row)
                yield events
                if finished:
                    keep = [row for row in range(len(alive)) if row not in finished]
                    alive = [alive[row] for row in keep]
                    if not alive:
                        return
                    index = torch.tensor(keep, device=m.device)
                    batch.keep(index)
                    tokens, prompt_of, last_weights = tokens[index], prompt_of[index], None
                if step == options.max_new_tokens - 1:
                    return
                if stream.cancelled:
                    continue  # report the cancel without another forward pass
                with self._lock:
                    base_lp, arm_lp = batch.step(tokens)
        finally:
            if stream.batch is not None:
                stream.batch.free()
            stream.batch = None

    def _final_event(self, seq, step, reason, panes) -> TokenEvent:
        prompt, pane = seq
        return TokenEvent(prompt, pane, step, -1, "", float("nan"), {}, float("nan"),
                          panes[pane].weights, reason)

    @torch.inference_mode()
    def _choose(self, base_lp, arm_lp, w, options, generators, prompt_of, eos):
        """Fuses, samples and packs what the host needs into one tensor (one sync)."""
        score = fusion.fuse(base_lp, arm_lp, w, options.normalised)
        logits = fusion.sampling_logits(score, options.temperature, options.top_k, options.top_p)
        noise = None
        if options.temperature > 0:
            V = score.shape[-1]
            noise = torch.stack([fusion.gumbel_noise(g, (V,)) for g in generators])[prompt_of]
        tokens = fusion.choose(logits, options.temperature, noise)
        pick = tokens[:, None]
        fused_lp = score.gather(-1, pick) - torch.logsumexp(score, -1, keepdim=True)
        packed = torch.cat([tokens[:, None].float(), base_lp.gather(-1, pick),
                            arm_lp.gather(-1, pick[:, None, :].expand(-1, arm_lp.shape[1], 1)).squeeze(-1),
                            fused_lp, torch.isin(tokens, eos)[:, None].float()], -1)
        return tokens, packed.tolist()

    # ---- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt, responses, add_eos: bool = True) -> list[dict[str, float]]:
        """Each ARM's trajectory reward beta * sum_t log pi_r(y_t | x, y_<t) of each response,
        the quantity the training loss compares (fusion.sequence_logprob)."""
        single = isinstance(responses, str)
        responses = [responses] if single else list(responses)
        ids = self.encode(prompt)
        eos_id = self.models.eos_ids[0] if add_eos and self.models.eos_ids else None
        seqs = [ids + response_ids(self.tokenizer, r, eos_id) for r in responses]
        logps = self.sequence_logprobs(seqs, [len(ids)] * len(seqs))
        out = [{n: self.models.betas[n] * float(logps[n][i]) for n in self.arm_names}
               for i in range(len(seqs))]
        return out[0] if single else out

    @torch.inference_mode()
    def sequence_logprobs(self, seqs: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
        """Sum of each ARM's (and the base's, under "base") log-probs of the tokens after the prompt."""
        m = self.models
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=m.device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=m.device)
        resp = torch.tensor([[0] * n + [1] * (len(s) - n) + [0] * (width - len(s))
                             for s, n in zip(seqs, prompt_lengths)], device=m.device)
        B, M = len(seqs), 1 + len(m.lora_arms)
        # logits only from the position before the first response token on (prompts need none)
        start = max(min(prompt_lengths) - 1, 0)
        keep = {"logits_to_keep": width - start}
        ids_kept, resp_kept = ids[:, start:], resp[:, start:]
        with self._lock:
            logits = m.backbone(input_ids=ids.repeat(M, 1), attention_mask=attn.repeat(M, 1),
                                **keep, **adapter_rows(m.lora_arms, B)).logits
        totals = fusion.sequence_logprob(logits[..., :m.vocab_size], ids_kept.repeat(M, 1),
                                         resp_kept.repeat(M, 1)).view(M, B)
        out = {"base": totals[0], **dict(zip(m.lora_arms, totals[1:]))}
        for name, model in m.standalone.items():
            lg = model(input_ids=ids, attention_mask=attn, **keep).logits[..., :m.vocab_size]
            out[name] = fusion.sequence_logprob(lg, ids_kept, resp_kept).to(totals.device)
        return out

