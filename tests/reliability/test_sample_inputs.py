"""`flowtrain sample` on bad weights and paths (issue 11, cases 7 and 8): one message naming the flag and the file,
exit 2, and for anything a path or a file header can show, before any model loads (it used to take ~15 s of
loading to say "When using the offline mode, you must specify a `weight_name`", or end in a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowtrain.cli import main
from flowtrain.testing.data import TINY_RES, TINY_SEQ

# Runs `main` on each argument list in a fresh process and reports (exit code, stderr) per call, and whether torch
# or diffusers were imported by then: the checks must answer before any of that loads.
PROBE = """
import contextlib, io, json, sys
from flowtrain.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    results.append([rc, err.getvalue()])
print(json.dumps({"results": results, "loaded": sorted(m for m in ("torch", "diffusers") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_pipeline_dir, tiny_cache) -> Path:
    """A real LoRA, from a 2-step training run on the tiny model."""
    from flowtrain.testing.training import train_config
    from flowtrain.train.loop import train

    out = tmp_path_factory.mktemp("lora") / "run"
    train(train_config(tiny_pipeline_dir, tiny_cache[1], out, train={"max_steps": 2}), progress=False)
    return out / "pytorch_lora_weights.safetensors"


def test_bad_paths_and_files_fail_before_anything_loads(tmp_path, tiny_pipeline_dir, lora_file):
    (tmp_path / "random.safetensors").write_bytes(os.urandom(1000))
    (tmp_path / "truncated.safetensors").write_bytes(lora_file.read_bytes()[:-100])
    (tmp_path / "no-lora").mkdir()
    (tmp_path / "no-lora" / "notes.txt").write_text("not weights")
    (tmp_path / "no-config").mkdir()
    full_weights = next((tiny_pipeline_dir / "transformer").glob("*.safetensors"))
    base = ["sample", "--model", str(tiny_pipeline_dir), "--prompt", "p", "--out", str(tmp_path / "out")]
    cases = {
        "--lora": [
            (tmp_path / "missing.safetensors", "no such file or folder"),
            (tmp_path / "random.safetensors", "not a readable safetensors file"),
            (tmp_path / "truncated.safetensors", "not a readable safetensors file"),
            (tmp_path / "no-lora", "the folder holds no .safetensors LoRA file"),
            (full_weights, "holds no LoRA tensors"),
        ],
        "--transformer": [
            (tmp_path / "missing", "no such file or folder"),
            (lora_file, "is a file"),
            (tmp_path / "no-config", "config.json is missing"),
        ],
        "--prompts": [(tmp_path / "missing.txt", "no such file")],
    }
    calls = [[*base, flag, str(path)] for flag, items in cases.items() for path, _ in items]
    calls.append(["sample", "--model", str(tmp_path / "no-model"), "--prompt", "p", "--out", str(tmp_path / "o")])
    expected = [(flag, path, why) for flag, items in cases.items() for path, why in items]
    expected.append(("--model", tmp_path / "no-model", "no such folder"))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (rc, err), (flag, path, why) in zip(report["results"], expected, strict=True):
        assert rc == 2, (flag, path, err)
        message = err.splitlines()[0]
        assert message.startswith("flowtrain sample: error: ") and flag in message and str(path) in message, err
        assert why in message and "Traceback" not in err, err
    assert report["loaded"] == []  # answered from paths and file headers alone
    assert not (tmp_path / "out").exists()


def _widened(lora: Path, dest: Path) -> str:
    """A copy of the LoRA with one tensor 3 columns wider: a LoRA made for another model's layer widths."""
    with safe_open(str(lora), framework="pt") as f:
        keys = f.keys()  # safe_open is not a dict: no iteration over it
        tensors, metadata = {k: f.get_tensor(k) for k in keys}, f.metadata()
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 3)
    save_file(tensors, str(dest), metadata=metadata)
    return name


def _sample_args(pipeline: Path, out: Path) -> list[str]:
    return ["sample", "--model", str(pipeline), "--prompt", "a photo number 1", "--out", str(out), "--steps", "1",
            "--height", str(TINY_RES), "--width", str(TINY_RES), f"model.max_sequence_length={TINY_SEQ}"]  # fmt: skip


def test_lora_for_another_model_is_one_message(tmp_path, tiny_pipeline_dir, lora_file, capsys):
    wide = tmp_path / "wide.safetensors"
    name = _widened(lora_file, wide)
    assert main([*_sample_args(tiny_pipeline_dir, tmp_path / "out"), "--lora", str(wide)]) == 2
    err = capsys.readouterr().err  # after diffusers' loading bars
    first = next(line for line in err.splitlines() if line.startswith("flowtrain sample: error: "))
    assert str(wide) in first and str(tiny_pipeline_dir) in first and "does not fit the model" in first
    assert name.split(".")[1] in first and "has shape [4, 131] in the file but [4, 128]" in first
    assert "Traceback" not in err and "Error(s) in loading state_dict" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a failed run


def test_lora_folder_with_one_weights_file_of_any_name_is_used(tmp_path, tiny_pipeline_dir, lora_file):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_style.safetensors").write_bytes(lora_file.read_bytes())
    assert main([*_sample_args(tiny_pipeline_dir, tmp_path / "out"), "--lora", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "out" / "000_00.png").exists()


def test_model_that_is_neither_a_folder_nor_cached_is_one_message(tmp_path, capsys):
    args = _sample_args(Path("no-such-org/no-such-model"), tmp_path / "out")
    assert main(args) == 2  # offline (HF_HUB_OFFLINE=1): diffusers' OSError, translated
    err = capsys.readouterr().err
    assert err.startswith("flowtrain sample: error: could not load 'no-such-org/no-such-model'")
    assert "Traceback" not in err and "stacktrace above" not in err


def _with_foreign_modules(lora: Path, out: Path, *, keep_own: bool) -> Path:
    """`lora` plus (or instead of) a module the tiny transformer lacks: a block index beyond its last."""
    tensors = load_file(str(lora)) if keep_own else {}
    tensors["transformer.transformer_blocks.99.attn.to_q.lora_A.weight"] = torch.zeros(4, 128)
    tensors["transformer.transformer_blocks.99.attn.to_q.lora_B.weight"] = torch.zeros(128, 4)
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize("keep_own", [True, False], ids=["partly-foreign", "all-foreign"])
def test_lora_modules_the_model_lacks_are_refused(tmp_path, tiny_pipeline_dir, lora_file, keep_own, capsys):
    """peft drops LoRA modules the model does not have without a word; a LoRA for another variant would then be
    applied in part, silently. One message instead, naming the file and what does not exist."""
    bad = _with_foreign_modules(lora_file, tmp_path / "foreign.safetensors", keep_own=keep_own)
    assert main([*_sample_args(tiny_pipeline_dir, tmp_path / "out"), "--lora", str(bad)]) == 2
    first = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("flowtrain sample: error: "))
    assert str(bad) in first and "does not fit the model" in first
    assert "transformer_blocks.99.attn.to_q" in first
    assert ("1 of its" in first) if keep_own else ("none of its modules exists" in first)
    assert not (tmp_path / "out").exists()
