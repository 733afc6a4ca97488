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
    (lambda d: d["profiles"]["demo"]["arms"][0].update(model={"hub": "x/y"}), "exactly one of 'adapter'"),
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
