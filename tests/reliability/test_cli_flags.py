"""A flag the user gives is never silently ignored (issue 11, case 6): the CLI used to test `if args.x:` / `args.x or
default`, so `--max_train_steps 0` or `--max-sequence-length 0` fell back to the config's value without a word.
Now a given value always applies, and one that makes no sense (0 steps, an empty path, a device this machine does
not have) is refused with one message naming the flag or key (exit 2), before anything loads."""

from __future__ import annotations

import pytest
import yaml

from flowtrain.cli import main


@pytest.fixture
def cfg(tmp_path, tiny_pipeline_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_pipeline_dir)}, "train": {"max_steps": 7}}))
    return str(path)


def test_max_train_steps_zero_is_refused_not_ignored(cfg, capsys):
    assert main(["check", cfg, "--max_train_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "greater than 0" in err and "Traceback" not in err
    assert main(["train", cfg, "--max_train_steps", "0"]) == 2  # refused before anything loads
    assert main(["check", cfg, "--max_train_steps", "3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 3


@pytest.mark.parametrize(
    "args",
    [
        ["prepare", "src", "--out", "o", "--shard-size", "0"],
        ["prepare", "src", "--out", "o", "--min-size", "0"],
        ["prepare", "src", "--out", "o", "--resolution", "0"],
        ["prepare", "src", "--out", ""],
        ["precompute", "raw", "--out", "o", "--model", "m", "--batch-size", "0"],
        ["precompute", "raw", "--out", "o", "--model", "m", "--resolution", "0"],
        ["precompute", "raw", "--model", "m", "--out", ""],
        ["sample", "--model", "m", "--prompt", "p", "--out", "o", "--steps", "0"],
        ["sample", "--model", "m", "--prompt", "p", "--out", "o", "--num-images", "0"],
        ["sample", "--model", "m", "--prompt", "p", "--out", "o", "--height", "0"],
        ["sample", "--model", "m", "--prompt", "p", "--out", "o", "--width", "-8"],
        ["train", "c.yaml", "--output_dir", ""],
        ["autoencoder", "a.yaml", "--output_dir", ""],
        ["demo", "--out", ""],
        ["precompute", "raw", "--out", "o", "--model", "m", "--device", "nonsense"],
        ["sample", "--model", "m", "--prompt", "p", "--out", "o", "--device", "cuda:99"],  # no such GPU here
    ],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)
def test_meaningless_flag_values_are_refused_by_name(args, capsys):
    flag = args[-2]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err


def test_a_given_flag_wins_over_the_config(tmp_path, tiny_pipeline_dir, capsys):
    """precompute with a config that says max_sequence_length 32 and an override of 8: the cache is made with 8;
    an override of 0 is refused by the family's options, naming the key."""
    import json

    from flowtrain.testing.data import make_image_folder

    make_image_folder(tmp_path / "img", n=2)
    assert main(["prepare", str(tmp_path / "img"), "--out", str(tmp_path / "raw"), "--quiet"]) == 0
    cfg = tmp_path / "c.yaml"
    model = {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": 32, "dtype": "float32"}
    cfg.write_text(yaml.safe_dump({"model": model, "dataset": {"cache_dir": str(tmp_path / "cache")}}))
    args = ["precompute", str(tmp_path / "raw"), "--config", str(cfg), "--resolution", "32", "--quiet"]
    assert main([*args, "model.max_sequence_length=0"]) == 2
    assert "model.max_sequence_length" in capsys.readouterr().err
    assert main([*args, "model.max_sequence_length=8", "model.text_encoder_layers=[0]"]) == 0
    fp = json.loads((tmp_path / "cache" / "manifest.json").read_text())["fingerprint"]
    assert fp["settings"]["max_sequence_length"] == 8 and fp["settings"]["text_encoder_layers"] == [0]


def test_a_missing_resume_checkpoint_is_refused_before_anything_loads(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", cfg, "--output_dir", str(run), "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-9'} is not a usable flowtrain checkpoint" in err
    assert f"{tmp_path} holds none" in err and "`latest`" in err
    assert not run.exists()  # refused before training started (it writes config.yaml first)
