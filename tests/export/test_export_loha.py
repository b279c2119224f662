"""LoHa (`lora.kind: loha`) in ComfyUI's format: every family's exported per-module ΔW, computed the way ComfyUI
reads LoHa keys, equals peft's own ΔW of the trained modules mapped onto the original layout (≤ 1e-6, fp32),
q/k/v fused exactly; formats that cannot hold LoHa (and LoKr, DoRA) refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtrain import export as ex
from flowtrain.models import get_family

RANK, ALPHA = 4, 12.0  # alpha ≠ rank: a lost alpha changes every ΔW


def _loha(name: str, root: Path) -> tuple[Path, torch.nn.Module]:
    """Every `all`-preset Linear with a LoHa of random factors (peft's init leaves one factor zero), saved the way
    training saves it."""
    import diffusers
    from peft import LoHaConfig

    from flowtrain.train.trainable import lora_target_regex

    family = get_family(name)
    pipeline = family.save_tiny_pipeline(root / "pipeline")
    cls = getattr(diffusers, json.loads((pipeline / "transformer" / "config.json").read_text())["_class_name"])
    t = cls.from_pretrained(pipeline / "transformer", torch_dtype=torch.float32)
    cfg = LoHaConfig(r=RANK, alpha=ALPHA, target_modules=lora_target_regex("all", family.lora_presets))
    t.add_adapter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "hada_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  family: {name}\n")
    return family.save_lora(run, t, cfg), t


def _peft_deltas(t: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{diffusers module.weight: ΔW} from peft's own LoHa layers (zeros for the Linears without one)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    out = {}
    for n, m in t.named_modules():
        if isinstance(m, LycorisLayer):
            out[f"{n}.weight"] = m.get_delta_weight("default").float()
        elif isinstance(m, torch.nn.Linear) and not n.endswith("base_layer"):
            out[f"{n}.weight"] = torch.zeros_like(m.weight)
    return out


def _comfyui_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{original module.weight: ΔW} as ComfyUI's LoHa adapter computes it: (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank,
    rank = hada_w1_b's rows."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith(".hada_w1_a"):
            base = k.removesuffix(".hada_w1_a")
            w = {p: sd[f"{base}.hada_{p}"].float() for p in ("w1_a", "w1_b", "w2_a", "w2_b")}
            scale = sd[f"{base}.alpha"].item() / w["w1_b"].shape[0]
            out[base.removeprefix("diffusion_model.") + ".weight"] = (
                (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * scale
            )
    return out


@pytest.fixture(scope="module")
def lohas(tmp_path_factory):
    """Family name → (LoHa file, its transformer), each made once per module."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            made[name] = _loha(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.mark.parametrize("name", ["flux2_klein", "flux1", "qwen_image"])
def test_loha_comfyui_delta_equals_peft_delta_in_original_layout(lohas, name, tmp_path):
    path, t = lohas(name)
    out = ex.export(path.parent, "comfyui", tmp_path / "loha.comfyui.safetensors")
    got = _comfyui_deltas(out)
    want_d = _peft_deltas(t)
    want = ex.weights_to_original(want_d, ex.layout_of(name))
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-6, k
    if name == "flux2_klein":  # independently of our table: diffusers' BFL → diffusers converter takes it back
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        back = convert_flux2_transformer_checkpoint_to_diffusers(dict(got))
        assert set(back) == set(want_d)
        for k in want_d:
            assert (back[k] - want_d[k]).abs().max().item() <= 1e-6, k


def test_fused_loha_is_exact_with_unequal_scales_and_absent_branches():
    g = torch.Generator().manual_seed(1)

    def branch(r: int, alpha: float, rows: int = 8, width: int = 6) -> ex.LohaModule:
        return ex.LohaModule(*(torch.randn(s, generator=g) for s in [(rows, r), (r, width), (rows, r), (r, width)]),
                             alpha=alpha)  # fmt: skip

    q, v = branch(2, 3.0), branch(3, 1.5)
    fused = ex.fuse_loha([q, None, v], [8, 8, 8])
    want = torch.cat([q.delta(), torch.zeros(8, 6), v.delta()])
    assert (fused.delta() - want).abs().max().item() <= 1e-5


def test_formats_refuse_what_they_cannot_hold(lohas, tmp_path):
    path, _ = lohas("flux2_klein")
    with pytest.raises(ex.ExportError, match="LoHa adapter.*plain LoRA.*and LoHa in comfyui.*--format diffusers"):
        ex.export(path.parent, "original", tmp_path / "x.safetensors")
