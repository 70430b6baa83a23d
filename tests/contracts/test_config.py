import pytest

from data_contracts.errors import ConfigError
from pipeline_config.load import load_config, parse_overrides, preset_names


def test_presets_load():
    assert {"demo", "nai-v2-fm"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.name == name


def test_override_sets_nested_value_with_yaml_types():
    cfg = load_config("demo", ["seed=7", "runtime.max_workers=3", "runtime.file_server.enabled=true"])
    assert cfg.seed == 7 and cfg.runtime.max_workers == 3 and cfg.runtime.file_server.enabled is True
    assert load_config("demo", {"runtime.device": "cuda"}).runtime.device == "cuda"


def test_unknown_key_names_dotted_path_and_closest_name():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["runtime.max_worker=3"])
    assert "runtime.max_worker" in str(err.value) and "max_workers" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config({"runtim": {}})
    assert "'runtim'" in str(err.value) and "runtime" in str(err.value)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["runtime.device=tpu"])
    assert "runtime.device" in str(err.value) and "tpu" in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("demo", ["seed.x=1"])
