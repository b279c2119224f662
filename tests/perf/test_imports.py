"""What each verb loads, asserted structurally (never timed; benchmarks/start.py measures the time): `--help`,
`check` and `prepare` import no torch / diffusers, a single-process run never imports DeepSpeed, and precompute
loads only its encoders, in the target dtype, on the target device, without constructing the transformer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowtrain.testing.data import TINY_RES, make_image_folder, tiny_config_dict

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "mlflow", "deepspeed", "matplotlib")

CODE = """
import json, sys
from flowtrain.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help
    code = e.code
print(json.dumps({"code": code, "modules": [m for m in HEAVY if m in sys.modules]}))
"""


def _loaded_by(*argv: str, cwd: Path) -> list[str]:
    """The heavy modules `flowtrain ARGV` imported, run in a fresh process as the console script runs it."""
    code = f"HEAVY = {HEAVY!r}\n{CODE}"
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    return result["modules"]


def test_help_check_and_prepare_import_no_torch(tmp_path):
    cfg = tiny_config_dict(tmp_path / "pipeline", tmp_path / "cache", tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    make_image_folder(tmp_path / "src", n=2)
    assert _loaded_by("--help", cwd=tmp_path) == []
    assert _loaded_by("train", "--help", cwd=tmp_path) == []
    assert _loaded_by("check", "cfg.yaml", cwd=tmp_path) == []
    assert _loaded_by("prepare", "src", "--out", "raw", "--quiet", cwd=tmp_path) == []


def test_drawing_the_graphs_imports_no_torch(tmp_path):
    """The MLflow child draws the end-of-run graphs while the trainer waits: importing torch there cost ~2 s."""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    rows = [
        {"step": s, "loss": 1.0 / s, "lr": 1e-4, "s_per_step": 0.01, "loss_by_sigma/0.0-0.1": 0.5} for s in (1, 2, 3)
    ]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = (
        "import sys; from pathlib import Path\n"
        "import flowtrain.track.mlflow_process\n"
        "from flowtrain.track.plots import plot_run, warm_up\n"
        "warm_up(); plot_run(Path(sys.argv[1]))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "graphs" / "loss.png").stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_single_process_training_never_imports_deepspeed(tiny_pipeline_dir, tiny_cache, tmp_path):
    """accelerate's unwrap_model imports DeepSpeed (and with it MLflow) just to test isinstance; flowtrain's
    `engines.unwrap` skips that where nothing is wrapped."""
    cfg = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", max_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    loaded = _loaded_by("train", "cfg.yaml", "--quiet", cwd=tmp_path)
    assert "torch" in loaded and "deepspeed" not in loaded and "mlflow" not in loaded  # JSONL tracking


def test_precompute_loads_only_the_encoders_in_the_target_dtype(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare
    from flowtrain.models.flux2_klein.family import Flux2Klein
    from flowtrain.testing.data import tiny_model

    built, loaded = [], []
    real_init, real_load = Flux2Transformer2DModel.__init__, Flux2Klein.load_encoders

    def counting_init(self, *args, **kwargs):  # observes; the real constructor still runs
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    def recording_load(self, *args, **kwargs):
        loaded.append(real_load(self, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Flux2Transformer2DModel, "__init__", counting_init)
    monkeypatch.setattr(Flux2Klein, "load_encoders", recording_load)
    prepare(make_image_folder(tmp_path / "src", n=2), tmp_path / "raw", progress=False)
    model = tiny_model(tiny_pipeline_dir, dtype="bfloat16")
    precompute(tmp_path / "raw", tmp_path / "cache", model, resolution=TINY_RES, device="cpu", progress=False)
    assert built == []  # the transformer is neither loaded nor constructed
    (pipe,) = loaded
    assert pipe.transformer is None
    for name in ("text_encoder", "vae"):
        params = list(getattr(pipe, name).parameters())
        assert {p.dtype for p in params} == {torch.bfloat16}, name
        assert {p.device.type for p in params} == {"cpu"}, name
