"""Training an autoregressive reward model (ARM): a LoRA adapter on the base, trained on
preference pairs with the GenARM loss (fusion.arm_loss over fusion.sequence_logprob).

    python -m genarm_core [--profile P] train --data prefs.jsonl --objective helpfulness --out runs/help

Devices and precision come from `accelerate` (CPU here; `accelerate launch -m genarm_core train
...` for several GPUs; bf16 mixed precision on GPUs that have it). The output is a PEFT adapter
folder plus genarm_arm.json (models.ARM_METADATA), which the engine reads when it loads the ARM.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import fusion
from .config import ModelSource, load_config
from .data import (LAYOUTS, PKU_LABELS, DataError, EncodedPair, collate, encode_pairs, file_sha256,
                   length_batches, read_pairs)
from .errors import TrainError
from .models import ARM_METADATA, eos_ids, load_source, tokenizer_fingerprint

METRICS_LOG = "train_log.jsonl"




@dataclass
class TrainConfig:
    data: list[str]
    objective: str
    output_dir: str
    beta: float = 0.5  # official: 0.5 helpfulness, 0.01 harmlessness, 0.05 HH-RLHF
    gamma: float = 0.0  # target margin
    nll_weight: float = 0.0  # weight of the chosen answers' mean token NLL (keeps the ARM fluent)
    length_normalise: bool = False
    layout: str = "auto"
    pku_label: str | None = None  # helpfulness / harmlessness; default: the objective's name
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05  # held out from `data` when no eval_data is given
    max_length: int = 512  # prompt + response tokens
    overlong: str = "skip"  # or "truncate"
    # the base: a folder, else the profile's base (config_path / profile as in the CLI)
    base_path: str | None = None
    config_path: str | None = None
    profile: str | None = None
    chat_template: bool | None = None  # None: the profile's (True with base_path)
    system_prompt: str | None = None  # None: the profile's
    # LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_layers: list[int] | None = None  # peft layers_to_transform; None: every layer
    # optimisation
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    batch_size: int = 4  # pairs per forward (2x rows: chosen and rejected)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps
    eval_every: int = 100  # optimizer steps; 0 = only before and after training
    eval_batch_size: int = 8
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else no
    progress: bool = True
    loss: str = "arm"  # arm: the GenARM loss; dpo: a DPO policy (the baseline), reference = the base


def check_config(c: TrainConfig):
    checks = [
        (bool(c.data), "data", "at least one file"),
        (isinstance(c.objective, str) and c.objective.replace("_", "").replace("-", "").isalnum(),
         "objective", "a name of letters, digits, '-' or '_'"),
        (bool(c.output_dir), "output_dir", "a folder"),
        (math.isfinite(c.beta) and c.beta > 0, "beta", "a positive number"),
        (math.isfinite(c.gamma), "gamma", "a finite number"),
        (math.isfinite(c.nll_weight) and c.nll_weight >= 0, "nll_weight", "a number >= 0"),
        (c.layout in LAYOUTS, "layout", f"one of {', '.join(LAYOUTS)}"),
        (0 <= c.eval_fraction < 1, "eval_fraction", "a number in [0, 1)"),
        (c.max_length is None or c.max_length >= 2, "max_length", "an integer >= 2"),
        (c.overlong in ("skip", "truncate"), "overlong", "skip or truncate"),
        (c.lora_r >= 1, "lora_r", "an integer >= 1"),
        (c.lora_alpha > 0, "lora_alpha", "a positive number"),
        (0 <= c.lora_dropout < 1, "lora_dropout", "a number in [0, 1)"),
        (bool(c.target_modules), "target_modules", "at least one module name"),
        (c.lora_layers is None or all(i >= 0 for i in c.lora_layers), "lora_layers", "layer indices >= 0"),
        (c.learning_rate > 0, "learning_rate", "a positive number"),
        (c.weight_decay >= 0, "weight_decay", "a number >= 0"),
        (0 <= c.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
        (c.epochs >= 1, "epochs", "an integer >= 1"),
        (c.batch_size >= 1, "batch_size", "an integer >= 1"),
        (c.grad_accum >= 1, "grad_accum", "an integer >= 1"),
        (c.max_grad_norm > 0, "max_grad_norm", "a positive number"),
        (c.max_steps is None or c.max_steps >= 1, "max_steps", "an integer >= 1"),
        (c.eval_every >= 0, "eval_every", "an integer >= 0"),
        (c.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1"),
        (c.log_every >= 1, "log_every", "an integer >= 1"),
        (c.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision", "auto, no, bf16 or fp16"),
        (c.loss in ("arm", "dpo"), "loss", "arm or dpo"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise TrainError(f"{name}: expected {expected}, got {getattr(c, name)!r}")


# ---- the model -------------------------------------------------------------------------------
def load_base(source: ModelSource, what: str = "base"):
    """The base model and tokenizer for training: float32 on the CPU (accelerate moves it)."""
    tokenizer, model = load_source(source, what, "cpu", torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def eos_id(model, tokenizer) -> int | None:
    """The EOS that ends every training response, as Engine.score uses."""
    ids = eos_ids(model, tokenizer)
    return ids[0] if ids else None


def add_lora(model, c: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = c.target_modules[0] if c.target_modules == ["all-linear"] else list(c.target_modules)
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=targets, layers_to_transform=c.lora_layers, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise TrainError(f"LoRA: {e}") from None


def pair_logprobs(model, batch, vocab_size: int, length_normalise: bool = False, trunk=None):
    """logp_r(y_w | x) and logp_r(y_l | x) of each pair, from one forward over the chosen and
    rejected rows of the batch (data.collate). trunk: (layer, hidden [rows, length, d]), the
    input of that decoder layer, from which the forward starts (see TrunkTap).

    Logits are kept only from the position before the earliest response token on: the
    [rows, length, vocab] logits dominate time and memory, and prompts are often most of length.
    """
    start = max(int(batch.response_mask.float().argmax(-1).min()) - 1, 0)
    width = batch.input_ids.shape[1]
    if trunk is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       logits_to_keep=width - start).logits
    else:
        logits = _upper_logits(model, trunk, batch.attention_mask, width - start)
    logp = fusion.sequence_logprob(logits[..., :vocab_size], batch.input_ids[:, start:],
                                   batch.response_mask[:, start:], length_normalise)
    return logp[:batch.pairs], logp[batch.pairs:]


def _peft(model):
    from peft import PeftModel

    return model if isinstance(model, PeftModel) else getattr(model, "module", model)


def _decoder(model):
    """The HF decoder (the module with .layers) of a supported architecture, else None."""
    from .backbone import SUPPORTED

    inner = _peft(model).get_base_model()
    decoder = getattr(inner, "model", None)
    ok = inner.config.model_type in SUPPORTED and isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList)
    return decoder if ok else None


def first_adapted_layer(model) -> int:
    """The lowest decoder layer with a LoRA module: layers below it are the base's own, so the
    adapter-off reference shares them with the policy. 0 when a module below the layers (e.g.
    the embedding) is adapted."""
    import re

    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in _peft(model).named_modules():
        if isinstance(module, LoraLayer):
            m = re.search(r"\.layers\.(\d+)\.", name)
            if m:
                layers.append(int(m.group(1)))
            elif not name.endswith("lm_head"):
                return 0
    return min(layers, default=0)


class TrunkTap:
    """Within `with`, keeps the input of the first adapted decoder layer from the forward that
    runs: (layer, hidden). DPO's reference forward then starts there instead of at the embedding
    (on SmolLM2 with LoRA on layers 20-29, 20 of 30 layers run once instead of twice). `.trunk`
    stays None where nothing can be shared."""

    def __init__(self, model):
        self.trunk, self._hook, self._below = None, None, None
        decoder, self._layer = _decoder(model), first_adapted_layer(model)
        if decoder is not None and self._layer > 0:
            self._below = decoder.layers[self._layer - 1]

    def __enter__(self):
        if self._below is not None:
            def keep(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                self.trunk = (self._layer, hidden.detach())
            self._hook = self._below.register_forward_hook(keep)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()


def _upper_logits(model, trunk, attention_mask, keep: int):
    """The logits of a forward from decoder layer `layer` up, on that layer's input `hidden`: the
    model's own forward with its lower layers taken out for the call (embedding skipped through
    inputs_embeds; positions and masks are built from the length as in a full forward)."""
    layer, hidden = trunk
    decoder = _decoder(model)
    layers = decoder.layers
    decoder.layers = layers[layer:]
    try:
        return model(inputs_embeds=hidden, attention_mask=attention_mask, logits_to_keep=keep).logits
    finally:
        decoder.layers = layers


def reference_logprobs(model, batch, vocab_size: int, length_normalise: bool = False, trunk=None):
    """The pairs' log-probs under the reference policy: the same model with its adapter off
    (from trunk, the shared lower layers' output of the policy's forward, when given)."""
    with torch.no_grad(), _peft(model).disable_adapter():
        return pair_logprobs(model, batch, vocab_size, length_normalise, trunk)


def dpo_logprobs(model, batch, vocab_size: int, length_normalise: bool = False):
    """(logp_w, logp_l) under the policy and (ref_w, ref_l) under the reference, the reference's
    forward starting above the layers the two share."""
    with TrunkTap(model) as tap:
        logp_w, logp_l = pair_logprobs(model, batch, vocab_size, length_normalise)
    return logp_w, logp_l, *reference_logprobs(model, batch, vocab_size, length_normalise, tap.trunk)


def batch_loss(model, batch, vocab_size: int, beta: float, gamma: float = 0.0, length_normalise: bool = False,
               nll_weight: float = 0.0, dpo: bool = False):
    """Mean loss of the batch and each pair's two rewards (log-probs for an ARM, log-probs over
    the reference's for DPO): a pair is ranked right when the chosen one's is larger."""
    if dpo:
        logp_w, logp_l, ref_w, ref_l = dpo_logprobs(model, batch, vocab_size, length_normalise)
        return fusion.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta).mean(), logp_w - ref_w, logp_l - ref_l
    logp_w, logp_l = pair_logprobs(model, batch, vocab_size, length_normalise)
    chosen_tokens = None if length_normalise else batch.response_mask[:batch.pairs, 1:].sum(-1)
    loss = fusion.arm_loss(logp_w, logp_l, beta, gamma, nll_weight, chosen_tokens)
    return loss.mean(), logp_w, logp_l


@torch.no_grad()
def evaluate(model, pairs: list[EncodedPair], c: TrainConfig, pad_id: int, vocab_size: int, accelerator) -> dict:
    """Preference accuracy (logp_r(y_w) > logp_r(y_l)), mean reward margin beta * (logp_w - logp_l)
    and mean preference loss (without the NLL term) over the held-out pairs (split across
    processes, then summed)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    batches = [order[i:i + c.eval_batch_size] for i in range(0, len(order), c.eval_batch_size)]
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # correct, margin, loss, n
    for idx in batches[accelerator.process_index::accelerator.num_processes]:
        batch = collate([pairs[i] for i in idx], pad_id).to(accelerator.device)
        if c.loss == "dpo":  # DPO's implicit reward: the log-prob over the reference's
            logp_w, logp_l, ref_w, ref_l = dpo_logprobs(model, batch, vocab_size, c.length_normalise)
            logp_w, logp_l = logp_w - ref_w, logp_l - ref_l
        else:
            logp_w, logp_l = pair_logprobs(model, batch, vocab_size, c.length_normalise)
        sums += torch.stack([(logp_w > logp_l).sum().double(), (c.beta * (logp_w - logp_l)).sum().double(),
                             (fusion.arm_loss(logp_w, logp_l, c.beta, 0.0) if c.loss == "dpo" else
                              fusion.arm_loss(logp_w, logp_l, c.beta, c.gamma)).sum().double(),
                             torch.tensor(float(len(idx)), dtype=torch.float64, device=sums.device)])
    sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
    correct, margin, loss, n = sums.tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {"accuracy": correct / n, "margin": margin / n, "loss": loss / n, "pairs": int(n)}


# ---- data ------------------------------------------------------------------------------------
def read_data(c: TrainConfig) -> tuple[list, list, dict]:
    """Reads and validates the train and held-out files (before any model is loaded, so that bad
    data fails fast); returns the pairs and a description of the files."""
    label = c.pku_label or (c.objective if c.objective in PKU_LABELS else None)
    info = {"files": [], "eval_files": []}

    def read(paths, kind):
        pairs = []
        for path in paths:
            got, layout = read_pairs(path, c.layout, label)
            info[kind].append({"path": str(path), "sha256": file_sha256(path),
                               "layout": layout, "records": len(got),
                               **({"pku_label": label} if layout == "pku" else {})})
            pairs += got
        return pairs

    return read(c.data, "files"), read(c.eval_data, "eval_files"), info


def encode_data(c: TrainConfig, train, held, info, tokenizer, eos, chat_template, system_prompt):
    """Token ids of the train and held-out pairs (held out from train when no eval files)."""
    encode = lambda pairs: encode_pairs(pairs, tokenizer, eos, c.max_length, c.overlong,  # noqa: E731
                                        chat_template, system_prompt)
    train, stats = encode(train)
    info["train"] = stats.as_dict()
    if c.eval_data:
        held, eval_stats = encode(held)
        info["eval"] = eval_stats.as_dict()
    else:
        random.Random(c.seed).shuffle(train)
        n_eval = max(round(c.eval_fraction * len(train)), 1) if c.eval_fraction > 0 and len(train) > 1 else 0
        held, train = train[:n_eval], train[n_eval:]
        info["eval"] = {"pairs": len(held), "held_out_fraction": c.eval_fraction}
    info["train_pairs"], info["eval_pairs"] = len(train), len(held)
    info["skipped"] = info["train"]["skipped_too_long"] + info["eval"].get("skipped_too_long", 0)
    if not train:
        raise DataError(f"{', '.join(c.data)}: no training pairs left after encoding "
                        f"(max_length {c.max_length}, overlong={c.overlong}: {info['train']})")
    return train, held, info


# ---- training ----------------------------------------------------------------------------------
def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_source(c: TrainConfig):
    """The base's source, and the prompt formatting to train with (the profile's, so that
    training sees what decoding sees)."""
    if c.base_path:
        if not Path(c.base_path).is_dir():
            raise TrainError(f"base_path: {c.base_path} is not a folder")
        chat = True if c.chat_template is None else c.chat_template
        return ModelSource(path=str(Path(c.base_path).resolve())), chat, c.system_prompt
    profile = load_config(c.config_path).profile(c.profile)
    chat = profile.chat_template if c.chat_template is None else c.chat_template
    return profile.base, chat, c.system_prompt if c.system_prompt is not None else profile.system_prompt


def sort_target_modules(config_path: Path) -> None:
    """PEFT writes target_modules from a set, in a different order each run; sort it so that
    retraining with the same settings gives the same adapter_config.json."""
    cfg = json.loads(config_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_path.write_text(json.dumps(cfg, indent=2) + "\n")


@dataclass
class Run:
    """Everything one training run holds, passed whole to the loop and the callbacks."""
    c: TrainConfig
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    params: list
    train: list
    held: list
    vocab: int
    pad: int
    total_steps: int
    per_process: int
    out: Path
    info: dict  # source, chat_template, system_prompt, eos, data, mixed_precision, tokenizer
    step: int = 0
    epoch: int = 0
    pairs_seen: int = 0
    train_seconds: float = 0.0
    loss: float = 0.0  # the last batch's
    correct: float = 0.0
    batch_pairs: int = 0
    history: list = field(default_factory=list)  # held-out evaluations
    initial: dict | None = None
    final: dict | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(c: TrainConfig) -> Run:
    """Data, model, LoRA, optimiser and schedule: everything before the first step."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    check_config(c)
    source, chat_template, system_prompt = _base_source(c)
    mixed = c.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    set_seed(c.seed)
    train, held, data_info = read_data(c)
    tokenizer, model = load_base(source)
    eos = eos_id(model, tokenizer)
    train, held, data_info = encode_data(c, train, held, data_info, tokenizer, eos, chat_template, system_prompt)
    model = add_lora(model, c)
    model.train()
    per_process = max(len(length_batches(train, c.batch_size, c.seed)) // accelerator.num_processes, 1)
    total_steps = math.ceil(per_process / c.grad_accum) * c.epochs
    total_steps = min(total_steps, c.max_steps) if c.max_steps else total_steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    # the schedule counts our optimizer steps, so it stays out of accelerator.prepare (which
    # would step it once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(c.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    info = {"source": source, "chat_template": chat_template, "system_prompt": system_prompt, "eos": eos,
            "data": data_info, "mixed_precision": mixed, "tokenizer": tokenizer}
    return Run(c, accelerator, model, optimizer, scheduler, params, train, held, len(tokenizer),
               tokenizer.pad_token_id, total_steps, per_process, Path(c.output_dir), info)


def train_steps(run: Run, on_step):
    """The loop: batches, forward, backward, optimizer steps; on_step(run) after each one."""
    c, acc = run.c, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    for run.epoch in range(c.epochs):
        batches = length_batches(run.train, c.batch_size, c.seed + run.epoch)[rank::world][:run.per_process]
        for i, idx in enumerate(batches):
            t0 = time.perf_counter()
            group_start = i - i % c.grad_accum
            group = min(c.grad_accum, len(batches) - group_start)
            last = i + 1 == group_start + group
            batch = collate([run.train[j] for j in idx], run.pad).to(acc.device)
            with contextlib.nullcontext() if last else acc.no_sync(run.model):
                loss, logp_w, logp_l = batch_loss(run.model, batch, run.vocab, c.beta, c.gamma, c.length_normalise,
                                                  c.nll_weight, dpo=c.loss == "dpo")
                acc.backward(loss / group)
            if last:
                acc.clip_grad_norm_(run.params, c.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            run.loss += float(loss.detach()) * len(idx)  # a host sync: the step is done
            run.correct += float((logp_w > logp_l).sum().detach())
            run.batch_pairs += len(idx)
            run.train_seconds += time.perf_counter() - t0
            run.pairs_seen += len(idx) * world
            if last:
                run.step += 1
                on_step(run)
                if run.step >= run.total_steps:
                    return


# ---- callbacks: evaluation, the metrics log, the progress bar ---------------------------------
class Evaluation:
    """Held-out evaluation at the start, every eval_every steps and at the end."""

    def start(self, run: Run):
        run.initial = self(run)

    def step(self, run: Run):
        if run.c.eval_every and run.step % run.c.eval_every == 0 and run.step < run.total_steps:
            self(run)

    def end(self, run: Run):
        run.final = self(run)

    def __call__(self, run: Run) -> dict | None:
        if not run.held:
            return None
        metrics = evaluate(run.model, run.held, run.c, run.pad, run.vocab, run.accelerator)
        run.history.append({"step": run.step, **metrics})
        return metrics


class MetricsLog:
    """OUT/train_log.jsonl: start, train (every log_every steps), eval and end records."""

    def __init__(self, run: Run):
        path = run.out / METRICS_LOG
        if run.main:
            run.out.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        self.file = open(path, "a") if run.main else None
        self.evals = 0

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def _new_evals(self, run: Run):
        for ev in run.history[self.evals:]:
            self.write({"event": "eval", "step": ev["step"], **{f"eval_{k}": v for k, v in ev.items() if k != "step"}})
        self.evals = len(run.history)

    def start(self, run: Run):
        self.write({"event": "start", "objective": run.c.objective, "loss": run.c.loss,
                    "base_model": run.info["source"].describe(), "train_pairs": len(run.train),
                    "eval_pairs": len(run.held), "skipped": run.info["data"]["skipped"],
                    "optimizer_steps": run.total_steps, "processes": run.accelerator.num_processes,
                    "mixed_precision": run.info["mixed_precision"], "device": str(run.accelerator.device)})
        self._new_evals(run)

    def step(self, run: Run):
        if run.step % run.c.log_every == 0 or run.step == run.total_steps:
            n = max(run.batch_pairs, 1)
            self.write({"event": "train", "step": run.step, "epoch": run.epoch, "loss": run.loss / n,
                        "accuracy": run.correct / n, "lr": run.scheduler.get_last_lr()[0],
                        "pairs_seen": run.pairs_seen, "pairs_per_s": run.pairs_seen / max(run.train_seconds, 1e-9)})
            run.loss, run.correct, run.batch_pairs = 0.0, 0.0, 0
        self._new_evals(run)

    def end(self, run: Run):
        self._new_evals(run)
        self.write({"event": "end", "step": run.step, "train_seconds": run.train_seconds,
                    "pairs_per_s": run.pairs_seen / max(run.train_seconds, 1e-9), "peak_rss_mb": peak_memory_mb()})
        if self.file:
            self.file.close()


class ProgressBar:
    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total_steps, desc=f"train {run.c.objective}", dynamic_ncols=True,
                        disable=not (run.c.progress and run.main))

    def start(self, run: Run):
        pass

    def step(self, run: Run):
        self.bar.update(1)

    def end(self, run: Run):
        self.bar.close()


def save(run: Run) -> dict:
    """The adapter folder: PEFT's files (LoRA matrices only) and genarm_arm.json; returns the metadata."""
    c, info = run.c, run.info
    run.accelerator.wait_for_everyone()
    metadata = {
        "objective": c.objective, "loss": c.loss, "beta": c.beta, "gamma": c.gamma,
        "length_normalise": c.length_normalise, "base_model": info["source"].describe(),
        "tokenizer_fingerprint": tokenizer_fingerprint(info["tokenizer"]), "chat_template": info["chat_template"],
        "system_prompt": info["system_prompt"], "eos_id": info["eos"],
        "heldout_accuracy": run.final["accuracy"] if run.final else None,
        "data": info["data"], "eval": run.final, "eval_initial": run.initial,
        "hyperparameters": {k: v for k, v in asdict(c).items()
                            if k not in ("data", "eval_data", "output_dir", "progress", "objective")},
        "steps": run.step, "pairs_seen": run.pairs_seen, "processes": run.accelerator.num_processes,
        "mixed_precision": info["mixed_precision"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        # the base weights are frozen: the adapter holds the LoRA matrices only, even with lm_head targeted
        run.accelerator.unwrap_model(run.model).save_pretrained(str(run.out), safe_serialization=True,
                                                                save_embedding_layers=False)
        sort_target_modules(run.out / "adapter_config.json")
        (run.out / ARM_METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return metadata


def train_arm(c: TrainConfig) -> dict:
    """Trains one ARM (or, with loss "dpo", a DPO policy) and writes the adapter folder; returns
    what happened (metrics, paths)."""
    run = setup(c)
    evaluation = Evaluation()
    callbacks = [evaluation, MetricsLog(run), ProgressBar(run)]  # evaluation first: the log reports it
    for cb in callbacks:
        cb.start(run)
    train_steps(run, lambda r: [cb.step(r) for cb in callbacks])
    for cb in callbacks:
        cb.end(run)
    metadata = save(run)
    rate = run.pairs_seen / max(run.train_seconds, 1e-9)
    return {"output_dir": str(run.out), "steps": run.step, "pairs_seen": run.pairs_seen,
            "train_seconds": run.train_seconds, "pairs_per_s": rate, "eval": run.final, "eval_initial": run.initial,
            "eval_history": run.history, "metadata": metadata, "peak_rss_mb": peak_memory_mb()}
