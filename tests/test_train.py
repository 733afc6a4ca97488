import json
import math
import random
import shutil

import pytest
import torch

from conftest import engine_for, make_model, save_model
from genarm_core import ModelLoadError, SamplingOptions, fusion
from genarm_core.cli import main as cli_main
from genarm_core.data import PreferencePair, collate, encode_pairs, file_sha256
from genarm_core.models import ARM_METADATA, tokenizer_fingerprint
from genarm_core.train import TrainConfig, add_lora, batch_loss, pair_logprobs, train_arm

# A learnable rule: chosen answers use GOOD words, rejected ones any other words. (Against varied
# rejected answers, the ARM can only win by making GOOD words likely, which guidance then shows.)
GOOD = "apple fruit sweet sun happy light green gold".split()
TOPICS = "tea rivers music clouds trains books cats winter games maps".split()


def other_words(tokenizer, n=300):
    """Plain words that are one token with or without a leading space, none of them GOOD."""
    vocab = tokenizer.get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:] in vocab and t[1:].isalpha()
                   and t[1:].islower() and len(t) > 4 and t[1:] not in GOOD)
    return words[::max(len(words) // n, 1)][:n]


def rule_pairs(n, seed, others):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k = r.randint(2, 4)
        out.append({"prompt": f"Tell me about {r.choice(TOPICS)}.", "chosen": " ".join(r.choices(GOOD, k=k)),
                    "rejected": " ".join(r.choices(others, k=k))})
    return out


def good_tokens(tokenizer, token_ids):
    ids = {i for w in GOOD for i in tokenizer(w, add_special_tokens=False)["input_ids"]
           + tokenizer(" " + w, add_special_tokens=False)["input_ids"]}
    return sum(t in ids for t in token_ids)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def rule_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rule")
    base = make_model(tokenizer, "llama", seed=0, hidden=32)
    with torch.no_grad():
        base.lm_head.weight.div_(3.0)  # a less peaked base, more like a trained LM's spread
    save_model(base, tokenizer, root / "base")
    others = other_words(tokenizer)
    train = write_jsonl(root / "train.jsonl", rule_pairs(96, 1, others))
    held = write_jsonl(root / "eval.jsonl", rule_pairs(32, 2, others))
    config = TrainConfig(data=[str(train)], eval_data=[str(held)], objective="fruit", output_dir=str(root / "arm"),
                         base_path=str(root / "base"), chat_template=False, beta=0.05, learning_rate=2e-2,
                         epochs=2, batch_size=8, eval_every=0, lora_dropout=0.0,
                         target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"],
                         progress=False)
    return {"root": root, "config": config, "result": train_arm(config), "train": train}


# ---- the loss ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tokenizer):
    model = make_model(tokenizer, "llama", seed=5, hidden=32, layers=1)
    pairs = [PreferencePair("Tell me about tea.", "It is hot and nice.", "No."),
             PreferencePair([{"role": "user", "content": "Hi"}], "Hello there", "Go away, please now")]
    encoded, _ = encode_pairs(pairs, tokenizer, eos_id=2)
    return model, encoded


def hand_logprob(model, prompt, response):
    """sum_t log p(response[t] | prompt, response[:t]) with one unpadded forward, in float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(response))


def test_loss_equals_an_independent_computation(small, tokenizer):
    model, encoded = small
    batch = collate(encoded, pad_id=2)
    with torch.no_grad():
        loss, logp_w, logp_l = batch_loss(model, batch, len(tokenizer), beta=0.5, gamma=0.3)
    hand_w = [hand_logprob(model, e.prompt, e.chosen) for e in encoded]
    hand_l = [hand_logprob(model, e.prompt, e.rejected) for e in encoded]
    assert logp_w.tolist() == pytest.approx(hand_w, abs=1e-3)
    assert logp_l.tolist() == pytest.approx(hand_l, abs=1e-3)
    hand_loss = [-math.log(1 / (1 + math.exp(-(0.5 * (w - l) - 0.3)))) for w, l in zip(hand_w, hand_l)]
    assert float(loss) == pytest.approx(sum(hand_loss) / len(hand_loss), abs=1e-4)


def test_only_response_logits_count(small, tokenizer):
    """Logits that predict prompt or padding tokens can change freely: the log-prob stays put."""
    model, encoded = small
    batch = collate(encoded, pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = fusion.sequence_logprob(logits, batch.input_ids, batch.response_mask)
    predicts_masked = batch.response_mask[:, 1:] == 0  # logits at t predict token t + 1
    noisy = logits.clone()
    noisy[:, :-1][predicts_masked] += 50 * torch.randn_like(noisy[:, :-1][predicts_masked])
    noisy[:, -1] += 50 * torch.randn_like(noisy[:, -1])  # the last position predicts nothing
    assert torch.allclose(fusion.sequence_logprob(noisy, batch.input_ids, batch.response_mask), base)
    padded = batch.input_ids.masked_fill(batch.attention_mask == 0, 7)  # another pad id
    assert torch.allclose(fusion.sequence_logprob(logits, padded, batch.response_mask), base)
    noisy[:, :-1][~predicts_masked] += 1.0 * torch.randn_like(noisy[:, :-1][~predicts_masked])
    assert not torch.allclose(fusion.sequence_logprob(noisy, batch.input_ids, batch.response_mask), base)
    # pair_logprobs keeps logits only from the first response on, and gives the same sums
    with torch.no_grad():
        w, l = pair_logprobs(model, batch, len(tokenizer))
    assert torch.allclose(torch.cat([w, l]), base, atol=1e-5)


def test_gamma_and_length_normalisation(small, tokenizer):
    model, encoded = small
    batch = collate(encoded, pad_id=2)
    with torch.no_grad():
        w, l = pair_logprobs(model, batch, len(tokenizer))
        wn, ln = pair_logprobs(model, batch, len(tokenizer), length_normalise=True)
    assert wn.tolist() == pytest.approx([x / len(e.chosen) for x, e in zip(w.tolist(), encoded)], rel=1e-5)
    assert ln.tolist() == pytest.approx([x / len(e.rejected) for x, e in zip(l.tolist(), encoded)], rel=1e-5)
    for gamma in (0.0, 1.0, -2.0):
        got = fusion.arm_loss(w, l, beta=0.05, gamma=gamma)
        want = [math.log1p(math.exp(-(0.05 * (a - b) - gamma))) for a, b in zip(w.tolist(), l.tolist())]
        assert got.tolist() == pytest.approx(want, rel=1e-5)
    # a larger target margin always costs more
    assert (fusion.arm_loss(w, l, 0.5, 1.0) > fusion.arm_loss(w, l, 0.5, 0.0)).all()


def test_nll_term_adds_the_chosen_mean_token_nll(small, tokenizer):
    model, encoded = small
    batch = collate(encoded, pad_id=2)
    with torch.no_grad():
        plain, w, l = batch_loss(model, batch, len(tokenizer), beta=0.5)
        mixed, _, _ = batch_loss(model, batch, len(tokenizer), beta=0.5, nll_weight=0.3)
        normed, wn, ln = batch_loss(model, batch, len(tokenizer), beta=0.5, length_normalise=True, nll_weight=0.3)
    hand_w = [hand_logprob(model, e.prompt, e.chosen) for e in encoded]
    nll = [-x / len(e.chosen) for x, e in zip(hand_w, encoded)]
    assert float(mixed) == pytest.approx(float(plain) + 0.3 * sum(nll) / len(nll), abs=1e-4)
    pref = [math.log1p(math.exp(-0.5 * (a - b))) for a, b in zip(wn.tolist(), ln.tolist())]
    assert float(normed) == pytest.approx(sum(p + 0.3 * n for p, n in zip(pref, nll)) / len(nll), abs=1e-4)


def test_lora_layers_and_target_modules_are_configurable(tokenizer):
    model = make_model(tokenizer, "llama", seed=0, hidden=32, layers=3)
    config = TrainConfig(data=["x"], objective="x", output_dir="x", target_modules=["q_proj", "o_proj"],
                         lora_layers=[1], lora_r=2)
    names = [n for n, p in add_lora(model, config).named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "o_proj"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dpo_reference_shares_the_unadapted_layers_and_equals_a_full_adapter_off_forward(tokenizer, arch):
    """With LoRA on the upper layers only, DPO's reference forward starts at the first adapted layer
    from the policy forward's hidden states: the lower layers run once per batch, the upper ones
    twice, and the reference log-probs equal a full forward with the adapter off (and the policy's
    differ from them: the adapter is not zero)."""
    from genarm_core.train import dpo_logprobs, first_adapted_layer, reference_logprobs

    model = make_model(tokenizer, arch, seed=3, hidden=32, layers=4)
    config = TrainConfig(data=["x"], objective="x", output_dir="x", lora_layers=[2, 3], lora_r=4,
                         target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    model = add_lora(model, config)
    with torch.no_grad():  # LoRA B starts at zero: make the policy differ from the reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert first_adapted_layer(model) == 2
    pairs = [PreferencePair("Tell me about tea.", "It is hot and nice.", "No."),
             PreferencePair("Hi there, how are you?", "Hello, I am fine.", "Go away, please now"),
             PreferencePair("Name a colour", "Green.", "A long answer that rambles on")]
    batch = collate(encode_pairs(pairs, tokenizer, eos_id=2)[0], pad_id=2)
    layers = model.get_base_model().model.layers
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    logp_w, logp_l, ref_w, ref_l = dpo_logprobs(model, batch, len(tokenizer))
    assert calls == [1, 1, 2, 2]
    full_w, full_l = reference_logprobs(model, batch, len(tokenizer))  # from the embedding
    for h in hooks:
        h.remove()
    assert ref_w.tolist() == pytest.approx(full_w.tolist(), abs=1e-5)
    assert ref_l.tolist() == pytest.approx(full_l.tolist(), abs=1e-5)
    assert (logp_w - ref_w).abs().max() > 1e-2
    with model.disable_adapter(), torch.no_grad():
        hand = [hand_logprob(model, e.prompt, e.chosen) for e in encode_pairs(pairs, tokenizer, eos_id=2)[0]]
    assert ref_w.tolist() == pytest.approx(hand, abs=1e-3)
    loss = batch_loss(model, batch, len(tokenizer), beta=0.1, dpo=True)[0]
    loss.backward()  # the policy side keeps its graph
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and ".layers.2." in n)


def test_an_adapted_embedding_shares_no_layers(tokenizer):
    from peft import LoraConfig, get_peft_model

    from genarm_core.train import TrunkTap, first_adapted_layer

    def adapted(targets):
        model = make_model(tokenizer, "llama", seed=3, hidden=32, layers=3)
        return get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))

    assert first_adapted_layer(adapted(["layers.1.self_attn.q_proj", "lm_head"])) == 1
    model = adapted(["embed_tokens", "layers.1.self_attn.q_proj"])
    assert first_adapted_layer(model) == 0
    assert TrunkTap(model).trunk is None and TrunkTap(model)._below is None


# ---- training ----------------------------------------------------------------------------------
def test_learns_the_rule_from_chance_to_90_percent(rule_run):
    res = rule_run["result"]
    assert res["eval_initial"]["accuracy"] <= 0.7
    assert res["eval"]["accuracy"] >= 0.9
    assert res["eval"]["margin"] > res["eval_initial"]["margin"]
    assert res["steps"] == 2 * 96 // 8
    log = [json.loads(line) for line in (rule_run["root"] / "arm" / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log][:2] == ["start", "eval"] and log[-1]["event"] == "end"
    assert any(r["event"] == "train" and "loss" in r and "lr" in r for r in log)
    assert [r["eval_accuracy"] for r in log if r["event"] == "eval"][-1] == res["eval"]["accuracy"]


def test_adapter_folder_and_metadata(rule_run, tokenizer):
    from peft import PeftModel

    arm = rule_run["root"] / "arm"
    assert (arm / "adapter_config.json").exists() and (arm / "adapter_model.safetensors").exists()
    meta = json.loads((arm / ARM_METADATA).read_text())
    assert meta["objective"] == "fruit" and meta["beta"] == 0.05
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert meta["base_model"] == f"path:{rule_run['root'] / 'base'}"
    assert meta["data"]["files"][0]["sha256"] == file_sha256(rule_run["train"])
    assert meta["data"]["train_pairs"] == 96 and meta["data"]["eval_pairs"] == 32 and meta["data"]["skipped"] == 0
    assert meta["heldout_accuracy"] == meta["eval"]["accuracy"] == rule_run["result"]["eval"]["accuracy"]
    assert meta["hyperparameters"]["lora_r"] == 8 and meta["hyperparameters"]["learning_rate"] == 2e-2
    base = make_model(tokenizer, "llama", seed=0, hidden=32)
    PeftModel.from_pretrained(base, str(arm))  # a standard PEFT adapter


def test_engine_follows_the_rule_with_the_trained_arm(rule_run, tokenizer):
    root = rule_run["root"]
    engine = engine_for(root / "base", [{"name": "fruit", "adapter": str(root / "arm")}], chat_template=False)
    assert engine.models.betas["fruit"] == 0.05  # from genarm_arm.json
    prompts = [f"Tell me about {t}." for t in ("tea", "boats", "snow")]
    # training and decoding see the same tokens, and the ARM's reward ranks a held-out pair
    pair, _ = encode_pairs([PreferencePair(prompts[0], "x", "y")], engine.tokenizer, engine.models.eos_ids[0],
                           chat_template=False)
    assert pair[0].prompt == engine.encode(prompts[0])
    r = engine.score(prompts[1], ["green apple sun", "dark iron rock"])
    assert r[0]["fruit"] > r[1]["fruit"]
    counts = [0, 0]
    for seed in range(2):
        opts = SamplingOptions(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=seed)
        for panes in engine.generate(prompts, [{"fruit": 0.0}, {"fruit": 2.0}], opts):
            for k, completion in enumerate(panes):
                counts[k] += good_tokens(engine.tokenizer, completion.token_ids)
    assert counts[1] >= counts[0] + 10, counts


def test_adapter_with_another_tokenizer_fingerprint_is_refused(rule_run, tmp_path):
    arm = shutil.copytree(rule_run["root"] / "arm", tmp_path / "arm")
    meta = json.loads((arm / ARM_METADATA).read_text())
    meta["tokenizer_fingerprint"] = "0123456789abcdef"
    (arm / ARM_METADATA).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="0123456789abcdef"):
        engine_for(rule_run["root"] / "base", [{"name": "fruit", "adapter": str(arm)}])


# ---- command line ------------------------------------------------------------------------------
def test_cli_trains_a_few_steps_on_a_profiles_base(rule_run, tmp_path, capsys):
    import yaml

    from conftest import profile_dict

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(profile_dict(rule_run["root"] / "base", chat_template=False,
                                                  system_prompt="Be brief.")))
    out = tmp_path / "cli_arm"
    rc = cli_main(["--config", str(models), "--profile", "tiny", "train", "--data", str(rule_run["train"]),
                   "--objective", "fruit", "--beta", "0.05", "--out", str(out), "--max-steps", "2",
                   "--batch-size", "4", "--grad-accum", "2", "--lora-r", "4", "--lora-layers", "0-1",
                   "--target-modules", "q_proj,v_proj", "--eval-fraction", "0.1", "--no-progress"])
    assert rc == 0
    assert "86 training pairs (0 skipped" in capsys.readouterr().err
    meta = json.loads((out / ARM_METADATA).read_text())
    assert meta["steps"] == 2 and meta["pairs_seen"] == 16 and meta["beta"] == 0.05
    assert meta["base_model"] == f"path:{rule_run['root'] / 'base'}"
    assert meta["chat_template"] is False and meta["system_prompt"] == "Be brief."  # the profile's
    assert meta["hyperparameters"]["lora_layers"] == [0, 1] and meta["data"]["eval_pairs"] == 10
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]  # sorted: same file every run


@pytest.mark.parametrize("extra,message", [
    (["--data", "{missing}"], "cannot read preference data"),
    (["--data", "{bad}"], "{bad}:2: field 'chosen'"),
    (["--data", "{train}", "--beta", "0"], "beta: expected a positive number"),
    (["--data", "{train}", "--nll-weight", "-1"], "nll_weight: expected a number >= 0"),
    (["--data", "{train}", "--base-path", "{missing}"], "base_path"),
])
def test_cli_errors_exit_2(rule_run, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" +
                   json.dumps({"prompt": "a", "chosen": 1, "rejected": "c"}) + "\n")
    paths = {"missing": str(tmp_path / "missing"), "bad": str(bad), "train": str(rule_run["train"])}
    extra = [e.format(**paths) for e in extra]
    base = [] if "--base-path" in extra else ["--base-path", str(rule_run["root"] / "base")]
    rc = cli_main(["train", "--objective", "x", "--out", str(tmp_path / "o"), "--no-progress", *base, *extra])
    assert rc == 2
    assert message.format(**paths) in capsys.readouterr().err


def test_dpo_loss_uses_the_base_as_reference_and_learns(tokenizer, tmp_path):
    """A DPO adapter starts at loss log 2 (policy = reference: zero-initialised LoRA B) and its
    implicit rewards rank the training rule's pairs after a few steps."""
    from genarm_core import fusion

    root = tmp_path
    base = make_model(tokenizer, "llama", seed=0)
    save_model(base, tokenizer, root / "base")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "chosen": "green apple sun",
                                         "rejected": "dark iron rock"}) + "\n"
                             for t in ["tea", "boats", "snow", "maps", "cats", "rain", "jazz", "bread"] * 3))
    config = TrainConfig(data=[str(pairs)], objective="fruit-dpo", output_dir=str(root / "dpo"), loss="dpo",
                         beta=0.5, base_path=str(root / "base"), chat_template=False, learning_rate=5e-3,
                         max_steps=12, batch_size=4, eval_fraction=0.2, lora_r=4, progress=False)
    result = train_arm(config)
    assert result["eval_initial"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result["eval"]["accuracy"] > 0.9 and result["eval"]["loss"] < result["eval_initial"]["loss"]
    meta = json.loads((root / "dpo" / ARM_METADATA).read_text())
    assert meta["loss"] == "dpo"
    w, l, rw, rl = (torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert float(fusion.dpo_loss(w, l, rw, rl, 0.5)) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
