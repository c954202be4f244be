from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, build_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = build_config({})
    assert isinstance(cfg, Config)
    assert cfg.run.seed == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.run.run_dir


def test_shipped_configs_include_the_documented_ones():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "ml1m.yaml", "ml100k.yaml", "beauty.yaml", "teacher-1b.yaml"} <= names


def test_unknown_top_level_key_lists_sections():
    with pytest.raises(ConfigError) as err:
        build_config({"trainer": {}})
    msg = str(err.value)
    assert "unknown key 'trainer'" in msg
    for section in ("run", "data", "teacher", "student", "distill", "precompute", "scaling", "deepspeed"):
        assert section in msg


def test_misspelt_nested_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"teacher": {"model": {"d_modle": 32}}})
    msg = str(err.value)
    assert "teacher.model.d_modle" in msg
    assert "d_model" in msg and "num_layers" in msg and "max_len" in msg


@pytest.mark.parametrize(
    "tree, key",
    [
        ({"teacher": {"model": {"d_model": -4}}}, "teacher.model.d_model"),
        ({"precompute": {"k": 0}}, "precompute.k"),
        ({"teacher": {"train": {"batch_size": "big"}}}, "teacher.train.batch_size"),
        ({"distill": {"alpha": 1.5}}, "distill.alpha"),
        ({"data": {"format": "xml"}}, "data.format"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
        ({"data": {"min_user_interactions": 2}}, "data.min_user_interactions"),
    ],
)
def test_bad_values_name_the_key(tree, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(tree)


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="divisible"):
        build_config({"student": {"model": {"d_model": 10, "num_heads": 3}}})


def test_a_partial_section_keeps_its_own_defaults():
    # The student's defaults (16 wide, 1 layer), not a generic model's, for the keys left out.
    default = build_config().student.model
    cfg = build_config({}, ["student.model.dropout=0.3"])
    assert cfg.student.model == default.model_copy(update={"dropout": 0.3})
    assert build_config({"student": {"model": {"num_layers": 3}}}).student.model.d_model == default.d_model


@pytest.mark.parametrize(
    "bands, message",
    [
        ([], "at least one band"),
        ([{"items": 5, "dim": 8}, {"items": 5, "dim": 4}], "the last must leave it null"),
        ([{"dim": 8}, {"dim": 4}], "every band but the last needs"),
        ([{"items": 5, "dim": 32}, {"dim": 4}], r"widths \[32\] exceed d_model \(16\)"),
        ([{"items": 5, "dim": 8, "width": 3}, {"dim": 4}], "valid keys here: dim, items"),
    ],
)
def test_item_dims_are_validated(bands, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"student": {"model": {"item_dims": bands}}})


def test_item_dims_need_tied_embeddings():
    with pytest.raises(ConfigError, match="needs tied_embeddings"):
        build_config({"student": {"model": {"tied_embeddings": False, "item_dims": [{"dim": 8}]}}})


def test_min_workers_bound():
    with pytest.raises(ConfigError, match="min_workers"):
        build_config({"scaling": {"num_workers": 2, "min_workers": 3}})


def test_k_larger_than_catalog_is_an_error():
    from cluster.plan_checks import catalog_problems

    cfg = build_config({"precompute": {"k": 500}})
    assert [p.message for p in catalog_problems(cfg, 100)] == ["precompute.k=500 is larger than the catalog (100 items)"]
    assert catalog_problems(cfg, 500) == []


def test_sweep_sizes_must_be_smaller_than_the_teacher():
    with pytest.raises(ConfigError, match="sweep.*fractions must be a non-empty list of sizes between 0 and 1.*got \\[1.5\\]"):
        build_config({"sweep": {"fractions": [0.1, 1.5]}})


def test_overrides_are_typed_and_nested():
    cfg = build_config({}, ["teacher.model.d_model=96", "run.run_dir=s3://bucket/run", "deepspeed.offload_optimizer=true"])
    assert cfg.teacher.model.d_model == 96
    assert cfg.run.run_dir == "s3://bucket/run"
    assert cfg.deepspeed.offload_optimizer == "cpu"  # true/false from configs written before nvme existed


def test_override_of_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'run.sede'"):
        build_config({}, ["run.sede=3"])


@pytest.mark.parametrize("text", ["no_equals_sign", "=3", "a..b=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_load_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {seed: [1, 2}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config({}, ["teacher.model.d_model=48", "eval.ks=[5,10]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_absolute_paths_leave_urls_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"run": {"run_dir": "runs/x"}, "data": {"path": "s3://b/log.txt"}}).with_absolute_paths()
    assert cfg.run.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.data.path == "s3://b/log.txt"


def test_augmentation_settings_are_canonical_and_reading_them_is_not_a_training_setting():
    from cluster.config import stage_fingerprint

    cfg = build_config({}, ["precompute.augment.ratio=1", "precompute.augment.ops=[mask,crop,crop]"])
    assert cfg.precompute.augment.ops == ["crop", "mask"]  # the rows depend on the list: one canonical form
    assert cfg.precompute.augment.settings() == {"ratio": 1.0, "ops": ["crop", "mask"], "rate": 0.3}
    assert build_config({}).precompute.augment.settings() is None
    with pytest.raises(ConfigError, match="ops"):
        build_config({}, ["precompute.augment.ops=[]"])
    # Which rows a student reads enters its fingerprint through the store (student_source), not this key.
    assert stage_fingerprint(build_config({}, ["distill.augmented=skip"]), "student", "t") == stage_fingerprint(build_config({}), "student", "t")
    with pytest.raises(ConfigError, match="distill.augmented is the sweep's to set"):
        build_config({}, ["sweep.variants={x: [distill.augmented=use]}"])
