"""Preference pairs for ARM training: readers for three JSONL layouts, tokenisation with the
engine's own prompt code (prompts.py), and batching by length.

Layouts (one JSON object per line):
    jsonl  {"prompt": str | [{"role", "content"}, ...], "chosen": str, "rejected": str,
            optional "chosen_complete": bool, "rejected_complete": bool (default true; false for
            a response cut off by a token limit: it gets no EOS, so the ARM does not learn to stop
            where sampling stopped)}
    hh     {"chosen": transcript, "rejected": transcript}   (Anthropic HH-RLHF, "\\n\\nHuman: ..."
           / "\\n\\nAssistant: ..."; the shared conversation is the prompt, the final assistant
           replies are the responses)
    pku    {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"}
           (PKU-SafeRLHF; helpfulness uses better_response_id, harmlessness safer_response_id)
Every error names the file, the line and the field.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .prompts import prompt_ids, response_ids

LAYOUTS = ("auto", "jsonl", "hh", "pku")
PKU_LABELS = {"helpfulness": "better_response_id", "harmlessness": "safer_response_id"}
ROLES = ("system", "user", "assistant")




@dataclass
class PreferencePair:
    prompt: object  # a string (one user turn) or a list of chat messages
    chosen: str
    rejected: str
    where: str = ""  # "file:line", for messages
    chosen_complete: bool = True  # False: cut off by a token limit, so no EOS after it
    rejected_complete: bool = True


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # response ids, EOS included when the response is complete
    rejected: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class EncodeStats:
    pairs: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_identical: int = 0
    max_length: int | None = None
    overlong: str = "skip"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- reading -----------------------------------------------------------------------------------
def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonl_records(path, what: str = "preference data"):
    """(line number, dict) for each non-blank line of a JSONL file, with errors naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def jsonl_rows(path, what: str = "records") -> list[dict]:
    """All of a JSONL file's objects (jsonl_records without the line numbers)."""
    return [row for _, row in jsonl_records(path, what)]


def _string(record, key, where, allow_empty=False) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}': is empty")
    return value


def _prompt(record, where):
    if "prompt" not in record:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt': is empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt': expected a string or a non-empty list of "
                        "{\"role\", \"content\"} messages")
    for i, m in enumerate(prompt):
        f = f"{where}: field 'prompt[{i}]'"
        if not isinstance(m, dict):
            raise DataError(f"{f}: expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{f}.role: expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{f}.content: expected a string, got {type(m.get('content')).__name__}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the last message must be from the user")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _flag(record, key, where) -> bool:
    value = record.get(key, True)
    if not isinstance(value, bool):
        raise DataError(f"{where}: field '{key}': expected true or false, got {json.dumps(value)}")
    return value


def read_jsonl(path) -> list[PreferencePair]:
    pairs = []
    for n, r in jsonl_records(path):
        where = f"{path}:{n}"
        pairs.append(PreferencePair(_prompt(r, where), _string(r, "chosen", where, allow_empty=True),
                                    _string(r, "rejected", where, allow_empty=True), where,
                                    _flag(r, "chosen_complete", where), _flag(r, "rejected_complete", where)))
    return pairs


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(text: str, where: str, key: str) -> tuple[list[dict], str]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> (conversation before the last reply, last reply)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5:
        raise DataError(f"{where}: field '{key}': expected a transcript of '\\n\\nHuman: ...' and "
                        "'\\n\\nAssistant: ...' turns ending with an assistant reply")
    turns = [({"Human": "user", "Assistant": "assistant"}[parts[i]], parts[i + 1].strip())
             for i in range(1, len(parts), 2)]
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise DataError(f"{where}: field '{key}': the transcript must end with a Human turn "
                        "followed by an Assistant reply")
    return [{"role": r, "content": c} for r, c in turns[:-1]], turns[-1][1]


def read_hh(path) -> list[PreferencePair]:
    pairs = []
    for n, r in jsonl_records(path):
        where = f"{path}:{n}"
        conv_w, chosen = split_hh(_string(r, "chosen", where), where, "chosen")
        conv_l, rejected = split_hh(_string(r, "rejected", where), where, "rejected")
        if conv_w != conv_l:
            raise DataError(f"{where}: fields 'chosen' and 'rejected': the transcripts differ "
                            "before the final assistant reply")
        pairs.append(PreferencePair(conv_w, chosen, rejected, where))
    return pairs


def read_pku(path, label: str) -> list[PreferencePair]:
    if label not in PKU_LABELS:
        raise DataError(f"{path}: PKU-SafeRLHF data needs a label (--pku-label, or an objective named "
                        f"{' or '.join(PKU_LABELS)}), got {label!r}")
    key = PKU_LABELS[label]
    pairs = []
    for n, r in jsonl_records(path):
        where = f"{path}:{n}"
        prompt = _prompt(r, where)
        responses = [_string(r, "response_0", where, True), _string(r, "response_1", where, True)]
        if key not in r:
            raise DataError(f"{where}: missing field '{key}' (needed for {label})")
        best = r[key]
        if best not in (0, 1) or isinstance(best, bool):
            raise DataError(f"{where}: field '{key}': expected 0 or 1, got {best!r}")
        pairs.append(PreferencePair(prompt, responses[best], responses[1 - best], where))
    return pairs


def detect_layout(path) -> str:
    for n, r in jsonl_records(path):
        if "response_0" in r:
            return "pku"
        if "prompt" in r:
            return "jsonl"
        if "chosen" in r:
            return "hh"
        raise DataError(f"{path}:{n}: cannot tell the layout: expected 'prompt'/'chosen'/'rejected' "
                        "(jsonl), 'chosen'/'rejected' transcripts (hh) or 'response_0'/'response_1' (pku)")
    raise DataError(f"{path}: no records")


def read_pairs(path, layout: str = "auto", pku_label: str | None = None) -> tuple[list[PreferencePair], str]:
    """Reads one file; returns the pairs and the layout used."""
    if layout not in LAYOUTS:
        raise DataError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(path)
    if layout == "pku":
        pairs = read_pku(path, pku_label)
    else:
        pairs = read_jsonl(path) if layout == "jsonl" else read_hh(path)
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs, layout


# ---- tokenising --------------------------------------------------------------------------------
def encode_pairs(pairs: list[PreferencePair], tokenizer, eos_id: int | None, max_length: int | None = None,
                 overlong: str = "skip", chat_template: bool = True,
                 system_prompt: str | None = None) -> tuple[list[EncodedPair], EncodeStats]:
    """Token ids exactly as the engine builds them (prompt_ids, response_ids).

    A pair longer than max_length (prompt + the longer response) is skipped, or with
    overlong="truncate" its responses lose their tails (the prompt is kept whole, as decoding
    sees it; a pair whose prompt leaves no room is skipped either way). Pairs whose two responses
    are identical carry no preference and are skipped.
    """
    if overlong not in ("skip", "truncate"):
        raise DataError(f"overlong: expected 'skip' or 'truncate', got {overlong!r}")
    stats = EncodeStats(max_length=max_length, overlong=overlong)
    out = []
    for p in pairs:
        prompt = prompt_ids(tokenizer, p.prompt, chat_template, system_prompt)
        chosen = response_ids(tokenizer, p.chosen, eos_id if p.chosen_complete else None)
        rejected = response_ids(tokenizer, p.rejected, eos_id if p.rejected_complete else None)
        if chosen == rejected:
            stats.skipped_identical += 1
            continue
        pair = EncodedPair(prompt, chosen, rejected)
        if max_length and pair.length > max_length:
            room = max_length - len(prompt)
            if overlong == "skip" or room < 1 or chosen[:room] == rejected[:room]:
                stats.skipped_too_long += 1
                continue
            pair = EncodedPair(prompt, chosen[:room], rejected[:room])
            stats.truncated += 1
        out.append(pair)
    stats.pairs = len(out)
    return out, stats


# ---- batching ----------------------------------------------------------------------------------
def length_batches(pairs: list[EncodedPair], batch_size: int, seed: int) -> list[list[int]]:
    """Indices grouped into batches of pairs of similar length (little padding), the batch order
    shuffled with the seed."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


@dataclass
class Batch:
    """Chosen rows first, then rejected rows: one padded batch for one forward."""
    input_ids: torch.Tensor  # [2B, L]
    attention_mask: torch.Tensor  # [2B, L]
    response_mask: torch.Tensor  # [2B, L]: 1 on response tokens (EOS included)
    pairs: int = 0

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                     self.pairs)


def collate(pairs: list[EncodedPair], pad_id: int) -> Batch:
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    ids, attn, resp = [], [], []
    for prompt, response in seqs:
        n = len(prompt) + len(response)
        ids.append(prompt + response + [pad_id] * (width - n))
        attn.append([1] * n + [0] * (width - n))
        resp.append([0] * len(prompt) + [1] * len(response) + [0] * (width - n))
    return Batch(torch.tensor(ids), torch.tensor(attn), torch.tensor(resp), len(pairs))
