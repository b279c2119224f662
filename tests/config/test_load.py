"""Tests for `flowtrain.config.load`: extends, overrides, provenance-aware errors, YAML quirks, dump/flatten."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flowtrain.config import (
    ConfigError,
    FlowtrainConfig,
    config_to_flat_dict,
    dump_config,
    load_config,
    save_config,
)
from flowtrain.config.load import OVERRIDE_SOURCE, resolve_config


def write(path: Path, text: str) -> Path:
    """Write dedented YAML, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def error_lines(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The per-problem lines of a validation ConfigError (the first line is a header)."""
    return str(exc.value).splitlines()[1:]


def line_for(exc: pytest.ExceptionInfo[ConfigError], key: str) -> str:
    """The one problem line about dotted `key`."""
    matches = [line for line in error_lines(exc) if f": {key}: " in line]
    assert len(matches) == 1, str(exc.value)
    return matches[0]


MINIMAL = "model:\n  family: flux2_klein\n  pretrained: org/model\n"


# --- extends -----------------------------------------------------------------------------------------------


def test_extends_recursive_deep_merge_child_wins(tmp_path: Path) -> None:
    write(
        tmp_path / "grand.yaml",
        """
        model: {family: flux2_klein, pretrained: org/base, dtype: float32, text_encoder_layers: [1, 2, 3]}
        train: {max_steps: 10, batch_size: 4, seed: 7}
        """,
    )
    write(
        tmp_path / "parent.yaml",
        """
        extends: grand.yaml
        train: {max_steps: 20}
        lora: {rank: 8}
        """,
    )
    child = write(
        tmp_path / "child.yaml",
        """
        extends: parent.yaml
        model: {dtype: float16, text_encoder_layers: [5]}
        train: {batch_size: 2}
        """,
    )
    cfg = load_config(child)
    assert cfg.model.pretrained == "org/base"  # only in the grandparent
    assert cfg.model.dtype == "float16"  # child beats grandparent inside the same section
    assert cfg.model.text_encoder_layers == [5]  # lists are replaced, not merged
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed) == (20, 2, 7)
    assert cfg.lora.rank == 8


def test_extends_path_is_relative_to_the_extending_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "configs" / "base.yaml", MINIMAL)
    child = write(tmp_path / "configs" / "exp" / "child.yaml", "extends: ../base.yaml\ntrain: {seed: 3}\n")
    monkeypatch.chdir(tmp_path)  # a cwd-relative lookup would find neither file
    cfg = load_config("configs/exp/child.yaml")
    assert cfg.model.pretrained == "org/model"
    assert cfg.train.seed == 3
    assert child.exists()


def test_extends_list_applies_bases_in_order(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", MINIMAL + "train: {seed: 1, max_steps: 11, batch_size: 3}\n")
    write(tmp_path / "b.yaml", "train: {seed: 2, max_steps: 22}\n")
    child = write(tmp_path / "child.yaml", "extends: [a.yaml, b.yaml]\ntrain: {seed: 3}\n")
    cfg = load_config(child)
    assert cfg.train.seed == 3  # child beats both bases
    assert cfg.train.max_steps == 22  # the later base beats the earlier one
    assert cfg.train.batch_size == 3  # keys only the first base sets survive


def test_diamond_extends_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", MINIMAL)
    write(tmp_path / "left.yaml", "extends: root.yaml\ntrain: {seed: 1}\n")
    write(tmp_path / "right.yaml", "extends: root.yaml\nlora: {rank: 4}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "extends: [left.yaml, right.yaml]\n"))
    assert (cfg.train.seed, cfg.lora.rank) == (1, 4)


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as exc:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(exc.value) and "b.yaml -> " in str(exc.value)


def test_self_extends_is_a_cycle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path / "self.yaml", "extends: self.yaml\n" + MINIMAL))


def test_extends_must_be_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`extends` must be"):
        load_config(write(tmp_path / "c.yaml", "extends: 3\n" + MINIMAL))


# --- overrides ---------------------------------------------------------------------------------------------


def test_overrides_of_several_types(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", MINIMAL + "dataset: {cache_dir: /data/cache}\n")
    cfg = load_config(
        path,
        [
            "train.learning_rate=3e-4",
            "train.max_steps=50",
            "train.gradient_checkpointing=true",
            "lora.targets=[to_q, to_k]",
            "dataset.cache_dir=null",
            "model.pretrained=other/model",
            "train_mode=full",
            "loss.kwargs.gamma=2.5",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.max_steps == 50
    assert cfg.train.gradient_checkpointing is True
    assert cfg.lora.targets == ["to_q", "to_k"]
    assert cfg.dataset.cache_dir is None
    assert cfg.model.pretrained == "other/model"
    assert cfg.train_mode == "full"
    assert cfg.loss.kwargs == {"gamma": 2.5}  # intermediate mappings are created


def test_later_override_wins_and_value_may_contain_equals(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", MINIMAL)
    cfg = load_config(path, ["train.seed=1", "train.seed=2", "output_dir=runs/a=b"])
    assert cfg.train.seed == 2
    assert cfg.output_dir == "runs/a=b"  # split at the first `=` only


def test_malformed_override_without_equals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="malformed override `train.seed`"):
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["train.seed"])


def test_malformed_override_empty_key_segment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="malformed override"):
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["train..seed=1"])


def test_override_into_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`model.pretrained` is 'org/model', not a mapping"):
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["model.pretrained.revision=x"])


def test_override_with_invalid_yaml_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["lora.targets=[a, b"])


# --- provenance and validation errors ----------------------------------------------------------------------


def test_provenance_tracks_last_setter(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", MINIMAL + "train: {seed: 1, max_steps: 5}\nloss: {kwargs: {a: 1, b: 2}}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {seed: 2}\nloss: {kwargs: [x]}\n")
    prov = resolve_config(child, ["train.max_steps=9"]).provenance
    assert prov["model.pretrained"] == str(tmp_path / "base.yaml")
    assert prov["train.seed"] == str(child)
    assert prov["train.max_steps"] == OVERRIDE_SOURCE
    assert prov["loss.kwargs"] == str(child)
    assert not any(k.startswith("loss.kwargs.") for k in prov)  # keys of the replaced mapping are gone


def test_unknown_key_in_base_names_base_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", MINIMAL + "train: {learnin_rate: 0.1}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {seed: 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    line = line_for(exc, "train.learnin_rate")
    assert line.strip().startswith(f"- {base}:")
    assert str(child) + ":" not in line
    assert "did you mean `train.learning_rate`?" in line


def test_value_overridden_in_child_is_blamed_on_child(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", MINIMAL + "train: {max_steps: 5}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {max_steps: lots}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    assert line_for(exc, "train.max_steps").strip().startswith(f"- {child}:")


def test_error_from_override_names_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["train.batch_sise=2"])
    line = line_for(exc, "train.batch_sise")
    assert OVERRIDE_SOURCE in line and "did you mean `train.batch_size`?" in line


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", MINIMAL + "timesteps: {zzzz: 1}\n"))
    line = line_for(exc, "timesteps.zzzz")
    assert "did you mean" not in line
    assert "valid keys at `timesteps`: scheme, logit_mean, logit_std, mode_scale, shift" in line


def test_unknown_top_level_key_suggests_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", MINIMAL + "optimiser: {name: sgd}\n"))
    assert "did you mean `optimizer`?" in line_for(exc, "optimiser")


def test_missing_pretrained_names_key_and_top_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "model: {}\n")  # the base set `model`, but the top file is where to add it
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    line = line_for(exc, "model.pretrained")
    assert line.strip().startswith(f"- {child}:")
    assert "missing" in line and "set it" in line and "`model.pretrained=...`" in line


def test_missing_model_section_says_which_key_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", "train: {seed: 1}\n"))
    assert "set `model.pretrained`" in line_for(exc, "model")


def test_wrong_type_says_expected_and_received(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", MINIMAL + "train: {max_steps: lots, learning_rate: fast}\n"))
    steps = line_for(exc, "train.max_steps")
    assert "expected `int`" in steps and "got 'lots'" in steps
    lr = line_for(exc, "train.learning_rate")
    assert "expected `float`" in lr and "got 'fast'" in lr


def test_union_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", MINIMAL + "lora: {targets: 5}\n"))
    line = line_for(exc, "lora.targets")  # not `lora.targets.str` / `lora.targets.list[str]`
    assert "valid string" in line and "valid list" in line and "got 5" in line


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    text = "train: {max_steps: -1, learnin_rate: 1}\ntrain_mode: partial\nbogus: 1\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", text))
    keys = {"model", "train.max_steps", "train.learnin_rate", "train_mode", "bogus"}
    assert len(error_lines(exc)) == len(keys)
    for key in keys:
        line_for(exc, key)
    assert isinstance(exc.value, ValueError)


def test_list_item_error_is_blamed_on_the_file_that_set_the_list(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "model: {family: flux2_klein, pretrained: x, text_encoder_layers: [1, two]}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    assert line_for(exc, "model.text_encoder_layers.1").strip().startswith(f"- {base}:")


# --- files and YAML ------------------------------------------------------------------------------------------


def test_missing_top_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as exc:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(exc.value)


def test_missing_base_names_the_extending_file(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "extends: gone.yaml\n" + MINIMAL)
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    message = str(exc.value)
    assert str(tmp_path / "gone.yaml") in message and f"extended from {child}" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.yaml", "model:\n  family: flux2_klein\n  pretrained: x\ntrain:\n  seed: 1\n   max_steps: 2\n"
    )
    with pytest.raises(ConfigError, match="invalid YAML") as exc:
        load_config(path)
    assert f"{path}, line 6" in str(exc.value)


def test_duplicate_key_is_an_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", MINIMAL + "train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'") as exc:
        load_config(path)
    assert "line 6" in str(exc.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "c.yaml", text))


def test_empty_base_file_is_allowed(tmp_path: Path) -> None:
    write(tmp_path / "empty.yaml", "")
    assert load_config(write(tmp_path / "c.yaml", "extends: empty.yaml\n" + MINIMAL)).model.pretrained == "org/model"


@pytest.mark.parametrize(("text", "expected"), [("1e-4", 1e-4), ("1E5", 1e5), ("-2.5e3", -2500.0), ("5e+2", 500.0)])
def test_scientific_notation_parses_as_float(tmp_path: Path, text: str, expected: float) -> None:
    path = write(tmp_path / "c.yaml", MINIMAL + f"timesteps: {{logit_mean: {text}}}\n")
    data = resolve_config(path).data
    assert isinstance(data["timesteps"]["logit_mean"], float)
    assert data["timesteps"]["logit_mean"] == expected
    assert load_config(path, [f"train.learning_rate={text.lstrip('-')}"]).train.learning_rate == abs(expected)


def test_quoted_scientific_notation_stays_a_string(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", 'model: {family: flux2_klein, pretrained: "1e5"}\n')
    assert load_config(path).model.pretrained == "1e5"


# --- dump, save, flatten ----------------------------------------------------------------------------------


def _custom_config() -> FlowtrainConfig:
    return FlowtrainConfig.model_validate(
        {
            "model": {"family": "flux2_klein", "pretrained": "1e5", "text_encoder_layers": [1, 2], "revision": None},
            "train": {"learning_rate": 1e-8, "max_grad_norm": None, "max_steps": 7},
            "train_mode": "full",
            "lora": {"targets": ["to_q", "to_v"], "rank": 4},
            "loss": {"kwargs": {"gamma": 2.0, "names": ["a"]}},
            "optimizer": {"betas": (0.8, 0.95)},
            "output_dir": "runs/x",
        }
    )


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = _custom_config()
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert path.read_text(encoding="utf-8") == dump_config(cfg)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.model.pretrained == "1e5"  # a float-looking string must be quoted by the dumper


def test_dump_puts_top_level_scalars_first() -> None:
    keys = [line.split(":")[0] for line in dump_config(_custom_config()).splitlines() if not line.startswith(" ")]
    assert keys[:2] == ["train_mode", "output_dir"]
    assert keys[2] == "model"


def test_flat_dict(tmp_path: Path) -> None:
    flat = config_to_flat_dict(_custom_config())
    assert flat["model.pretrained"] == "1e5"
    assert flat["train.learning_rate"] == 1e-8
    assert flat["train.max_steps"] == 7
    assert flat["train.max_grad_norm"] is None
    assert flat["train.gradient_checkpointing"] is False
    assert flat["optimizer.betas"] == "[0.8, 0.95]"
    assert flat["model.text_encoder_layers"] == "[1, 2]"
    assert flat["loss.kwargs.gamma"] == 2.0
    assert flat["loss.kwargs.names"] == '["a"]'
    assert flat["train_mode"] == "full"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flat.values())
    assert "model" not in flat and "lora.alpha" in flat
