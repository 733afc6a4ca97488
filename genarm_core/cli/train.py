"""`train`: an ARM (or a DPO baseline policy) as a LoRA adapter on preference pairs."""
import argparse
import sys

from ..data import LAYOUTS, PKU_LABELS
from ..train import METRICS_LOG, TrainConfig, train_arm


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


def register(subparsers):
    d = TrainConfig(data=[], objective="", output_dir="")
    t = subparsers.add_parser(
        "train", help="train an ARM (LoRA adapter) on preference pairs",
        description="Train an autoregressive reward model: a LoRA adapter on the profile's base (or "
                    "--base-path) with loss -log sigmoid(beta * (logp(chosen) - logp(rejected)) - gamma). "
                    "Writes a PEFT adapter folder with genarm_arm.json, ready for an `adapter:` ARM.",
        formatter_class=_Help)
    for add in (_data_args, _objective_args, _model_args, _optimisation_args, _output_args):
        add(t, d)
    t.set_defaults(func=run)
    return t


def _data_args(t, d: TrainConfig):
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


def _objective_args(t, d: TrainConfig):
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


def _model_args(t, d: TrainConfig):
    m = t.add_argument_group("model and LoRA")
    m.add_argument("--base-path", help="base model folder (default: the profile's base)")
    m.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scaling: the update is scaled by alpha / r")
    m.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    m.add_argument("--target-modules", type=_names, default=",".join(d.target_modules),
                   help="comma-separated module names to adapt, or all-linear")
    m.add_argument("--lora-layers", type=_int_list,
                   help="only adapt these layers, e.g. 0-5,10 (peft layers_to_transform; default: all)")


def _optimisation_args(t, d: TrainConfig):
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


def _output_args(t, d: TrainConfig):
    r = t.add_argument_group("output")
    r.add_argument("--out", dest="output_dir", required=True, help="adapter folder to write")
    r.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate on the held-out pairs every N optimizer steps (0: only at the start and end)")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="pairs per forward when evaluating")
    r.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"write training metrics to OUT/{METRICS_LOG} every N steps")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args):
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
