"""Config errors fail before anything starts and name the key, the value and the fix."""

from pathlib import Path

import pytest
import yaml

from raycpt.config import ConfigError, CPTConfig, PrepareConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def valid() -> dict:
    return {
        "name": "r",
        "storage_path": "/tmp/runs",
        "model": {"path": "/models/base"},
        "data": {"sources": [{"name": "d", "path": "/data/d"}]},
        "train": {"max_steps": 10, "micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-4},
        "deepspeed": {},
        "scaling": {"num_workers": 2},
    }


def set_key(cfg: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
        node = node[p]
    node[last] = value
    return cfg


def test_valid_config_derives_grad_accum_and_defaults():
    cfg = parse_config(valid())
    assert cfg.grad_accum == 1
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.train.schedule.name == "rewarm_cosine"
    assert cfg.horizon_steps == 10


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("deepspeed.zero_stage", 5, ["deepspeed.zero_stage", "0, 1, 2 or 3", "got 5"]),
        ("train.lr", -0.1, ["train.lr", "greater than 0", "-0.1"]),
        ("train.micro_batch_size", 0, ["train.micro_batch_size", "greater than or equal to 1"]),
        ("train.max_steps", "many", ["train.max_steps", "valid integer", "'many'"]),
        ("train.global_batch_size", 6, ["global_batch_size (6) must be a multiple", "(4)"]),
        ("data.seq_len", 4, ["data.seq_len", "greater than or equal to 8"]),
        ("deepspeed.precision", "fp8", ["deepspeed.precision", "'auto', 'bf16', 'fp16' or 'fp32'"]),
        ("train.betas", [0.9, 1.5], ["betas must each be in [0, 1)"]),
    ],
)
def test_bad_values_name_key_and_fix(key, value, expect):
    with pytest.raises(ConfigError) as err:
        parse_config(set_key(valid(), key, value))
    for text in expect:
        assert text in str(err.value)


def test_elastic_range_must_hold_the_global_batch():
    """Every worker count an elastic run may shrink or grow to must split the global batch."""
    cfg = valid()
    cfg["train"].update(micro_batch_size=1, global_batch_size=12)
    cfg["scaling"] = {"num_workers": 4, "min_workers": 2}
    parsed = parse_config(cfg)  # 2, 3 and 4 all divide 12
    assert parsed.scaling.elastic and parsed.scaling.worker_counts == [2, 3, 4]
    cfg["train"]["global_batch_size"] = 8
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert "worker counts [3]" in str(err.value) and "a multiple of 12 (e.g. 12)" in str(err.value)
    cfg["scaling"] = {"num_workers": 2, "min_workers": 3}
    with pytest.raises(ConfigError, match=r"min_workers \(3\) must not exceed"):
        parse_config(cfg)


def test_unknown_key_is_rejected_with_its_path():
    cfg = valid()
    cfg["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        parse_config(cfg)


def test_missing_key_is_named():
    cfg = valid()
    del cfg["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr: required key is missing"):
        parse_config(cfg)


def test_model_needs_exactly_one_of_path_or_init():
    cfg = set_key(valid(), "model", {"path": "/m", "init": {"model_type": "llama"}})
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        parse_config(cfg)


def test_offload_param_needs_zero3():
    with pytest.raises(ConfigError, match="offload_param needs zero_stage: 3"):
        parse_config(set_key(valid(), "deepspeed.offload_param", True))


def test_schedule_points_must_be_sorted_and_names_unique():
    cfg = valid()
    cfg["data"]["sources"].append({"name": "d", "path": "/x"})
    with pytest.raises(ConfigError, match="source names must be unique"):
        parse_config(cfg)
    cfg = valid()
    cfg["data"]["sources"][0]["schedule"] = [{"at": 0.5, "weight": 1}, {"at": 0.1, "weight": 1}]
    with pytest.raises(ConfigError, match="sorted by `at`"):
        parse_config(cfg)


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    data = yaml.safe_load(path.read_text())
    model = PrepareConfig if "inputs" in data else CPTConfig
    assert load_config(path, model)


def test_digest_is_stable_and_sensitive():
    a, b = parse_config(valid()), parse_config(valid())
    assert a.digest() == b.digest()
    assert parse_config(set_key(valid(), "train.lr", 2e-4)).digest() != a.digest()


def test_readme_config_reference_is_current():
    from raycpt.config import reference_markdown

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->\n") + len(
        "<!-- config-reference:start -->\n"
    )
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == reference_markdown(), "run: raycpt config-reference"
