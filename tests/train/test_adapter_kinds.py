"""`lora.kind: lora | loha | lokr | dora`: each trains, resumes bitwise, saves its kind in the file header, and
reloads through `flowtrain sample`'s loader with the outputs it trained to; config and export refusals."""

from __future__ import annotations

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.testing.data import TINY_SEQ, tiny_config_dict, tiny_model
from flowtrain.testing.training import assert_resume_exact
from flowtrain.testing.training import train_config as _cfg
from flowtrain.train.loop import train

KINDS = {  # kind → its own options (non-defaults, so each reaches peft)
    "loha": {"rank_dropout": 0.1},
    "lokr": {"decompose_factor": 4, "rank_dropout": 0.1},
    "dora": {"dropout": 0.1},
}


def _lora(kind: str) -> dict:
    return {"kind": kind, "rank": 4, "alpha": 8, "targets": "attention", **KINDS[kind]}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_resumes_exactly(tiny_pipeline_dir, tiny_cache, tmp_path, kind):
    """4 steps straight == 2 steps, resume, 2 more: losses and trainable weights bitwise (dropouts included)."""
    extra = {"lora": _lora(kind), "train": {"max_steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": None}}
    a, b = (_cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / run, **extra) for run in "ab")
    assert_resume_exact(a, b, stop=2)


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind_run(request, tiny_pipeline_dir, tiny_cache, tmp_path_factory):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path_factory.mktemp(request.param) / "run")
    d["lora"] = _lora(request.param)
    d["train"].update(max_steps=4, learning_rate=5e-3)
    return request.param, train(FlowtrainConfig.model_validate(d), progress=False)


def test_file_records_kind_and_reloads_with_same_outputs(kind_run, tiny_pipeline_dir):
    """The saved file says its kind in its header; the sampling pipeline's loader (diffusers for dora / lokr, peft
    for loha) rebuilds a transformer that computes what the trained one computes."""
    from flowtrain.models import get_family
    from flowtrain.sample import load_sampling_pipeline
    from flowtrain.weights_check import adapter_kind

    kind, run = kind_run
    file = run.output_dir / "pytorch_lora_weights.safetensors"
    assert adapter_kind(file) == kind
    pipe = load_sampling_pipeline(tiny_model(tiny_pipeline_dir, max_sequence_length=TINY_SEQ), lora=str(file),
                                  device="cpu")  # fmt: skip
    family = get_family("flux2_klein")
    g = torch.Generator().manual_seed(0)
    x, txt, sigma = torch.randn(1, 64, 16, generator=g), torch.randn(1, TINY_SEQ, 96, generator=g), torch.tensor([0.4])
    run.transformer.eval()
    with torch.no_grad():
        trained = family.predict(run.transformer, x, sigma, {"text_embeds": txt}, (8, 8))
        loaded = family.predict(pipe.transformer, x, sigma, {"text_embeds": txt}, (8, 8))
        from diffusers import Flux2Transformer2DModel

        base_model = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
        base = family.predict(base_model, x, sigma, {"text_embeds": txt}, (8, 8))
    assert (trained - loaded).abs().max().item() <= 1e-6
    assert (trained - base).abs().max().item() > 1e-4  # the adapter learned something


def test_kinds_export_where_a_format_holds_them(kind_run):
    """diffusers holds every kind; comfyui holds LoHa (tests/export/test_export_loha.py checks its ΔW); the rest
    is refused with a message naming the kind."""
    from flowtrain.export import ExportError, export

    kind, run = kind_run
    assert export(run.output_dir, "diffusers", family="flux2_klein").name == "pytorch_lora_weights.safetensors"
    name = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[kind]
    for fmt in ("original",) if kind == "loha" else ("comfyui", "original"):
        with pytest.raises(ExportError, match=f"{name} adapter.*--format diffusers"):
            export(run.output_dir, fmt, family="flux2_klein")
    if kind == "loha":
        out = export(run.output_dir, "comfyui", family="flux2_klein")
        from safetensors.torch import load_file

        assert any(k.endswith(".hada_w1_a") for k in load_file(str(out)))


@pytest.mark.parametrize(
    ("lora", "match"),
    [
        ({"kind": "loha", "dropout": 0.1}, "lora.dropout is an option of lora.kind lora / dora.*rank_dropout"),
        ({"kind": "lora", "decompose_factor": 4}, "lora.decompose_factor is an option of lora.kind lokr"),
        ({"kind": "dora", "rank_dropout": 0.1}, "lora.rank_dropout is an option of lora.kind loha / lokr"),
        ({"kind": "lokr", "init": "default"}, "lora.init is an option of lora.kind lora / dora"),
        ({"kind": "lokr", "decompose_factor": 0}, "decompose_factor must be -1 or a positive divisor"),
        ({"kind": "ia3"}, "lora.kind"),
    ],
)
def test_config_refuses_options_of_another_kind(tiny_pipeline_dir, tiny_cache, tmp_path, lora, match):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "r")
    d["lora"].update(lora)
    with pytest.raises(ValueError, match=match):
        FlowtrainConfig.model_validate(d)


def test_default_kind_builds_the_same_peft_config_as_before():
    """kind lora (the default) must build exactly the LoraConfig flowtrain always built: no use_dora key set."""
    from flowtrain.config.schema import LoraConfig
    from flowtrain.train.trainable import adapter_config

    cfg = adapter_config(LoraConfig(rank=4), "x")
    assert type(cfg).__name__ == "LoraConfig" and not cfg.use_dora and cfg.init_lora_weights == "gaussian"


def test_flowtrain_sample_loads_every_kind(kind_run, tiny_pipeline_dir, tmp_path):
    """`flowtrain sample --lora RUN` (the CLI: file checks, kind detection, diffusers or peft loading) writes an
    image for each kind."""
    from flowtrain.cli import main

    _, run = kind_run
    args = ["sample", "--model", str(tiny_pipeline_dir), "--lora", str(run.output_dir), "--out", str(tmp_path),
            "--prompt", "a photo number 1", "--steps", "2", "--height", "32", "--width", "32"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "000_00.png").is_file()
