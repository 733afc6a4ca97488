"""Training an autoregressive reward model (ARM): a LoRA adapter on the base, trained on
preference pairs with the GenARM loss (fusion.arm_loss over fusion.sequence_logprob).

    python -m genarm_core [--profile P] train --data prefs.jsonl --objective helpfulness --out runs/help

Devices and precision come from `accelerate` (CPU here; `accelerate launch -m genarm_core train
...` for several GPUs; bf16 mixed precision on GPUs that have it). The output is a PEFT adapter
folder plus genarm_arm.json (models.ARM_METADATA), which the engine reads when it loads the ARM.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import fusion
from .cli import CliError
from .config import ModelSource, load_config
from .data import (LAYOUTS, PKU_LABELS, DataError, EncodedPair, collate, encode_pairs, file_sha256,
                   length_batches, read_pairs)
from .models import ARM_METADATA, eos_ids, load_source, tokenizer_fingerprint

METRICS_LOG = "train_log.jsonl"


class TrainError(CliError):
    """A bad training option."""


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


def pair_logprobs(model, batch, vocab_size: int, length_normalise: bool = False):
    """logp_r(y_w | x) and logp_r(y_l | x) of each pair, from one forward over the chosen and
    rejected rows of the batch (data.collate).

    Logits are kept only from the position before the earliest response token on: the
    [rows, length, vocab] logits dominate time and memory, and prompts are often most of length.
    """
    start = max(int(batch.response_mask.float().argmax(-1).min()) - 1, 0)
    width = batch.input_ids.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   logits_to_keep=width - start).logits
    logp = fusion.sequence_logprob(logits[..., :vocab_size], batch.input_ids[:, start:],
                                   batch.response_mask[:, start:], length_normalise)
    return logp[:batch.pairs], logp[batch.pairs:]


def reference_logprobs(model, batch, vocab_size: int, length_normalise: bool = False):
    """The pairs' log-probs under the reference policy: the same model with its adapter off."""
    from peft import PeftModel

    peft_model = model if isinstance(model, PeftModel) else getattr(model, "module", model)
    with torch.no_grad(), peft_model.disable_adapter():
        return pair_logprobs(model, batch, vocab_size, length_normalise)


def batch_loss(model, batch, vocab_size: int, beta: float, gamma: float = 0.0, length_normalise: bool = False,
               nll_weight: float = 0.0, dpo: bool = False):
    """Mean loss of the batch and each pair's two rewards (log-probs for an ARM, log-probs over
    the reference's for DPO): a pair is ranked right when the chosen one's is larger."""
    logp_w, logp_l = pair_logprobs(model, batch, vocab_size, length_normalise)
    if dpo:
        ref_w, ref_l = reference_logprobs(model, batch, vocab_size, length_normalise)
        return fusion.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta).mean(), logp_w - ref_w, logp_l - ref_l
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
        logp_w, logp_l = pair_logprobs(model, batch, vocab_size, c.length_normalise)
        if c.loss == "dpo":  # DPO's implicit reward: the log-prob over the reference's
            ref_w, ref_l = reference_logprobs(model, batch, vocab_size, c.length_normalise)
            logp_w, logp_l = logp_w - ref_w, logp_l - ref_l
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


class MetricsLog:
    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path else None

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


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


def train_arm(c: TrainConfig) -> dict:
    """Trains one ARM and writes the adapter folder; returns what happened (metrics, paths)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    check_config(c)
    source, chat_template, system_prompt = _base_source(c)
    mixed = c.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    main = accelerator.is_main_process
    set_seed(c.seed)

    train, held, data_info = read_data(c)
    tokenizer, model = load_base(source)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    eos = eos_id(model, tokenizer)
    train, held, data_info = encode_data(c, train, held, data_info, tokenizer, eos, chat_template, system_prompt)

    model = add_lora(model, c)
    model.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = max(len(length_batches(train, c.batch_size, c.seed)) // world, 1)
    total_steps = math.ceil(per_process / c.grad_accum) * c.epochs
    if c.max_steps:
        total_steps = min(total_steps, c.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    # the schedule counts our optimizer steps, so it stays out of accelerator.prepare (which
    # would step it once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(c.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    out = Path(c.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_LOG).unlink(missing_ok=True)
    log = MetricsLog(out / METRICS_LOG if main else None)
    log.write({"event": "start", "objective": c.objective, "base_model": source.describe(),
               "train_pairs": len(train), "eval_pairs": len(held), "skipped": data_info["skipped"],
               "optimizer_steps": total_steps,
               "processes": world, "mixed_precision": mixed, "device": str(accelerator.device)})

    history = []

    def run_eval(step):
        if not held:
            return None
        metrics = evaluate(model, held, c, pad, vocab, accelerator)
        history.append({"step": step, **metrics})
        log.write({"event": "eval", "step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    initial = run_eval(0)
    bar = tqdm(total=total_steps, desc=f"train {c.objective}", disable=not (c.progress and main),
               dynamic_ncols=True)
    step, pairs_seen, train_seconds = 0, 0, 0.0
    window = {"loss": 0.0, "correct": 0.0, "pairs": 0}
    done = False
    for epoch in range(c.epochs):
        batches = length_batches(train, c.batch_size, c.seed + epoch)[rank::world][:per_process]
        for i, idx in enumerate(batches):
            t0 = time.perf_counter()
            group_start = i - i % c.grad_accum
            group = min(c.grad_accum, len(batches) - group_start)
            last = i + 1 == group_start + group
            batch = collate([train[j] for j in idx], pad).to(accelerator.device)
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                loss, logp_w, logp_l = batch_loss(model, batch, vocab, c.beta, c.gamma, c.length_normalise,
                                                    c.nll_weight, dpo=c.loss == "dpo")
                accelerator.backward(loss / group)
            if last:
                accelerator.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window["loss"] += float(loss.detach()) * len(idx)  # a host sync: the step is done
            window["correct"] += float((logp_w > logp_l).sum().detach())
            window["pairs"] += len(idx)
            train_seconds += time.perf_counter() - t0
            pairs_seen += len(idx) * world
            if not last:
                continue
            step += 1
            bar.update(1)
            if step % c.log_every == 0 or step == total_steps:
                n = max(window["pairs"], 1)
                record = {"event": "train", "step": step, "epoch": epoch, "loss": window["loss"] / n,
                          "accuracy": window["correct"] / n, "lr": scheduler.get_last_lr()[0],
                          "pairs_seen": pairs_seen, "pairs_per_s": pairs_seen / max(train_seconds, 1e-9)}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
                window = {"loss": 0.0, "correct": 0.0, "pairs": 0}
            if c.eval_every and step % c.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step >= total_steps:
                done = True
                break
        if done:
            break
    bar.close()
    final = run_eval(step)

    accelerator.wait_for_everyone()
    metadata = {
        "objective": c.objective, "loss": c.loss, "beta": c.beta, "gamma": c.gamma,
        "length_normalise": c.length_normalise,
        "base_model": source.describe(), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "chat_template": chat_template, "system_prompt": system_prompt, "eos_id": eos,
        "heldout_accuracy": final["accuracy"] if final else None,
        "data": data_info, "eval": final, "eval_initial": initial,
        "hyperparameters": {k: v for k, v in asdict(c).items()
                            if k not in ("data", "eval_data", "output_dir", "progress", "objective")},
        "steps": step, "pairs_seen": pairs_seen, "processes": world, "mixed_precision": mixed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if main:
        # the base weights are frozen: the adapter holds the LoRA matrices only, even with lm_head targeted
        accelerator.unwrap_model(model).save_pretrained(str(out), safe_serialization=True,
                                                        save_embedding_layers=False)
        sort_target_modules(out / "adapter_config.json")
        (out / ARM_METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    log.write({"event": "end", "step": step, "train_seconds": train_seconds,
               "pairs_per_s": pairs_seen / max(train_seconds, 1e-9), "peak_rss_mb": peak_memory_mb()})
    log.close()
    return {"output_dir": str(out), "steps": step, "pairs_seen": pairs_seen, "train_seconds": train_seconds,
            "pairs_per_s": pairs_seen / max(train_seconds, 1e-9), "eval": final, "eval_initial": initial,
            "eval_history": history, "metadata": metadata, "peak_rss_mb": peak_memory_mb()}


# ---- command line ------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    """'0,1,4-7' -> [0, 1, 4, 5, 6, 7]"""
    out = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0,1,4-7, got {text!r}") from None
    return out


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected module names like q_proj,v_proj (or all-linear)")
    return names


class _Help(argparse.HelpFormatter):
    """Shows the default after each option's help where there is one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default" not in text and not flag and action.default not in (None, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def add_train_parser(subparsers):
    d = TrainConfig(data=[], objective="", output_dir="")
    t = subparsers.add_parser(
        "train", help="train an ARM (LoRA adapter) on preference pairs",
        description="Train an autoregressive reward model: a LoRA adapter on the profile's base (or "
                    "--base-path) with loss -log sigmoid(beta * (logp(chosen) - logp(rejected)) - gamma). "
                    "Writes a PEFT adapter folder with genarm_arm.json, ready for an `adapter:` ARM.",
        formatter_class=_Help)
    g = t.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="preference pairs, JSONL (repeatable)")
    g.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                   help="jsonl: prompt/chosen/rejected; hh: Anthropic HH-RLHF transcripts; pku: "
                        "PKU-SafeRLHF; auto: guess from the first record")
    g.add_argument("--pku-label", choices=sorted(PKU_LABELS),
                   help="which PKU-SafeRLHF label picks the chosen response (default: the objective "
                        "when it is helpfulness or harmlessness)")
    g.add_argument("--eval-data", action="append", default=[], metavar="FILE",
                   help="held-out pairs (repeatable); without it, --eval-fraction of --data is held out")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="fraction of --data held out for evaluation when no --eval-data is given")
    g.add_argument("--max-length", type=int, default=d.max_length,
                   help="most tokens of prompt + response per pair")
    g.add_argument("--overlong", choices=("skip", "truncate"), default=d.overlong,
                   help="what to do with a pair over --max-length: skip it, or cut its responses' tails")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                   help="format prompts as raw text (default: the profile's setting)")
    g.add_argument("--system-prompt", help="system message for every prompt (default: the profile's)")
    o = t.add_argument_group("objective")
    o.add_argument("--objective", required=True, help="name of the ARM's objective, e.g. helpfulness")
    o.add_argument("--beta", type=float, default=d.beta,
                   help="reward scale; official: 0.5 helpfulness, 0.01 harmlessness, 0.05 HH-RLHF")
    o.add_argument("--gamma", type=float, default=d.gamma, help="target reward margin")
    o.add_argument("--nll-weight", type=float, default=d.nll_weight,
                   help="add this times the chosen answers' mean token NLL to the loss: keeps the ARM a "
                        "fluent LM when training long (0: the plain GenARM loss)")
    o.add_argument("--length-normalise", action="store_true",
                   help="divide each response's log-prob by its length")
    o.add_argument("--loss", choices=("arm", "dpo"), default=d.loss,
                   help="arm: the GenARM loss (an ARM for guided decoding); dpo: a DPO policy adapter "
                        "(reference = the base, adapter off), the training-time baseline")
    m = t.add_argument_group("model and LoRA")
    m.add_argument("--base-path", help="base model folder (default: the profile's base)")
    m.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scaling: the update is scaled by alpha / r")
    m.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    m.add_argument("--target-modules", type=_names, default=",".join(d.target_modules),
                   help="comma-separated module names to adapt, or all-linear")
    m.add_argument("--lora-layers", type=_int_list,
                   help="only adapt these layers, e.g. 0-5,10 (peft layers_to_transform; default: all)")
    p = t.add_argument_group("optimisation")
    p.add_argument("--lr", dest="learning_rate", type=float, default=d.learning_rate, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="fraction of the steps spent warming up, then cosine decay")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training pairs")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="pairs per forward per device (pairs of similar length are batched together)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=d.mixed_precision,
                   help="auto: bf16 on a GPU that supports it, else full precision")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the LoRA init, the held-out split and the batch order")
    r = t.add_argument_group("output")
    r.add_argument("--out", dest="output_dir", required=True, help="adapter folder to write")
    r.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate on the held-out pairs every N optimizer steps (0: only at the start and end)")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="pairs per forward when evaluating")
    r.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"write training metrics to OUT/{METRICS_LOG} every N steps")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.set_defaults(func=cmd_train)
    return t


def cmd_train(args):
    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields and k not in ("profile",)}
    config = TrainConfig(config_path=args.config, profile=args.profile, **values)
    result = train_arm(config)
    ev, data = result["eval"], result["metadata"]["data"]
    summary = (f"wrote {result['output_dir']}: {data['train_pairs']} training pairs "
               f"({data['skipped']} skipped as over --max-length, {data['train']['truncated']} truncated, "
               f"{data['train']['skipped_identical']} with identical responses skipped), {result['steps']} steps, "
               f"{result['pairs_per_s']:.2f} pairs/s")
    if ev:
        summary += f"; held-out accuracy {ev['accuracy']:.3f}, margin {ev['margin']:.4f} ({ev['pairs']} pairs)"
    print(summary, file=sys.stderr)
