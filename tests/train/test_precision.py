"""Mixed precision and gradient checkpointing: the config's precision rules, fp32 trainable weights on a bf16 base
under bf16 autocast, fp16 with a GradScaler (CUDA only), and checkpointing that recomputes and gives the same grads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from flowtrain.config import FlowtrainConfig


def _validate(**sections) -> FlowtrainConfig:
    return FlowtrainConfig.model_validate({"model": {"family": "flux2_klein", "pretrained": "x"}, **sections})


def test_precision_rules():
    assert _validate().train.mixed_precision == "bf16"  # auto follows model.dtype (bfloat16 by default)
    assert (
        _validate(model={"family": "flux2_klein", "pretrained": "x", "dtype": "float32"}).train.mixed_precision == "no"
    )
    assert (
        _validate(model={"family": "flux2_klein", "pretrained": "x", "dtype": "float16"}).train.mixed_precision
        == "fp16"
    )
    assert _validate(
        train={"mixed_precision": "bf16"}, model={"family": "flux2_klein", "pretrained": "x", "dtype": "float32"}
    )
    with pytest.raises(ValidationError) as exc:
        _validate(train={"mixed_precision": "no"})
    assert "model.dtype=bfloat16" in str(exc.value) and "train.mixed_precision=bf16" in str(exc.value)
    with pytest.raises(ValidationError, match="train.mixed_precision=fp16"):
        _validate(
            model={"family": "flux2_klein", "pretrained": "x", "dtype": "float16"}, train={"mixed_precision": "bf16"}
        )
    # a full fine-tune keeps fp32 master weights whatever model.dtype says, so any autocast is fine
    assert _validate(train_mode="full", train={"mixed_precision": "no"}).train.mixed_precision == "no"


def test_config_error_names_both_keys_when_loaded_from_yaml(tmp_path):
    from flowtrain.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  family: flux2_klein\n  pretrained: x\n  dtype: bfloat16\ntrain:\n  mixed_precision: 'no'\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "model.dtype" in str(exc.value) and "train.mixed_precision" in str(exc.value)


def test_bf16_base_lora_trains_in_fp32_under_autocast(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    from flowtrain.testing.training import RecordingLoss, fresh_accelerator_state, train_config
    from flowtrain.train.loop import train

    RecordingLoss.calls.clear()
    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", model={"dtype": "bfloat16"},
        train={"max_steps": 2, "mixed_precision": "auto"}, loss={"name": "flowtrain.testing.training:RecordingLoss"},
    )  # fmt: skip
    assert cfg.train.mixed_precision == "bf16"
    with fresh_accelerator_state():
        result = train(cfg, progress=False)
    assert all(c["autocast"] for c in RecordingLoss.calls) and len(RecordingLoss.calls) == 2
    params = dict(result.transformer.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n and params[n].dtype == torch.float32 for n in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n not in trainable)
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_full_finetune_keeps_fp32_master_weights(tiny_pipeline_dir):
    from flowtrain.models import get_family
    from flowtrain.train.trainable import build_transformer

    cfg = _validate(model={"pretrained": str(tiny_pipeline_dir), "dtype": "bfloat16"}, train_mode="full")
    transformer, lora_cfg = build_transformer(cfg, get_family("flux2_klein"))
    assert lora_cfg is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in transformer.parameters())


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 autocast + GradScaler need CUDA (refused on CPU, see below)"
)


@pytest.mark.cuda
@needs_cuda
def test_fp16_uses_a_grad_scaler(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    from flowtrain.testing.training import fresh_accelerator_state, train_config
    from flowtrain.train.loop import train

    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", model={"dtype": "float16"},
        train={"max_steps": 2, "mixed_precision": "fp16"},
    )  # fmt: skip
    with fresh_accelerator_state():
        train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "scaler.pt").exists()
    assert all(t.dtype == torch.float32 for t in load_file(str(ckpt / "trainable.safetensors")).values())


@pytest.mark.cuda
@needs_cuda
def test_fp16_grad_scaler_resumes_exactly(tiny_pipeline_dir, tiny_cache, tmp_path):
    """fp16 end to end on a GPU: 4 steps straight equal 2 steps, a checkpoint, and 2 resumed steps (losses and
    weights bitwise), and the GradScaler comes back from scaler.pt: both runs end with the same scale and growth
    tracker. A resume that dropped scaler.pt would restart the tracker at 0 and end on another state."""
    from flowtrain.testing.training import assert_resume_exact, fresh_accelerator_state, train_config

    def cfg(name: str):
        return train_config(
            tiny_pipeline_dir, tiny_cache[1], tmp_path / name, model={"dtype": "float16"},
            train={"max_steps": 4, "mixed_precision": "fp16", "deterministic": True},
            checkpoint={"every_steps": 2, "keep_last": None},
        )  # fmt: skip

    with fresh_accelerator_state():
        assert_resume_exact(cfg("straight"), cfg("resumed"), stop=2)

    def scaler(name: str, step: int) -> dict:
        return torch.load(tmp_path / name / f"checkpoint-{step}" / "scaler.pt", weights_only=True)

    fresh = torch.amp.GradScaler("cuda").state_dict()  # 65536, tracker 0: what a resume without scaler.pt starts at
    mid = scaler("resumed", 2)
    assert (mid["scale"], mid["_growth_tracker"]) != (fresh["scale"], fresh["_growth_tracker"])
    assert scaler("straight", 4) == scaler("resumed", 4)


def test_gradient_checkpointing_recomputes_and_matches(tiny_pipeline_dir):
    """On: every block's forward runs again in backward; the gradients equal those without checkpointing."""
    from flowtrain.models import get_family
    from flowtrain.train.trainable import build_transformer

    family = get_family("flux2_klein")
    g = torch.Generator().manual_seed(0)
    x, txt, sigma = torch.randn(2, 64, 16, generator=g), torch.randn(2, 32, 96, generator=g), torch.tensor([0.3, 0.7])
    grads, calls = [], []
    for on in (False, True):
        cfg = _validate(
            model={"pretrained": str(tiny_pipeline_dir), "dtype": "float32"},
            train={"gradient_checkpointing": on}, lora={"rank": 4, "targets": "attention+ff"},
        )  # fmt: skip
        torch.manual_seed(0)
        transformer, _ = build_transformer(cfg, family)
        assert transformer.is_gradient_checkpointing is on
        with torch.no_grad():  # non-zero B, so every LoRA matrix gets a gradient
            for n, p in transformer.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        count = [0]
        block = transformer.single_transformer_blocks[0]  # a pre-hook: recomputation may stop early
        block.register_forward_pre_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        family.predict(transformer, x, sigma, {"text_embeds": txt}, (8, 8)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls == [1, 2]  # recomputed in backward only with checkpointing
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_on_cpu_is_refused_with_what_to_use_instead(tiny_pipeline_dir, tiny_cache, tmp_path):
    """accelerate runs fp16 as fp32 on CPU, where a float16 base would fail in its first matmul. The refusal comes
    before anything is written, and before accelerate fixes the process's precision: bf16 still works after it."""
    from flowtrain.testing.training import fresh_accelerator_state, train_config
    from flowtrain.train.loop import train

    fp16 = train_config(
        tiny_pipeline_dir,
        tiny_cache[1],
        tmp_path / "fp16",
        model={"dtype": "float16"},
        train={"mixed_precision": "auto"},
    )
    assert fp16.train.mixed_precision == "fp16"
    bf16 = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "bf16", model={"dtype": "bfloat16"},
        train={"mixed_precision": "auto", "max_steps": 1},
    )  # fmt: skip
    with fresh_accelerator_state():
        with pytest.raises(ValueError, match="needs a GPU.*model.dtype=bfloat16"):
            train(fp16, progress=False)
        assert not (tmp_path / "fp16").exists()
        assert len(train(bf16, progress=False).losses) == 1  # the same process, no accelerate reset in between


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """The fp16 scale and its growth tracker are part of the resume state (a fresh scaler would restart at 65536
    and skip steps it had already learned to avoid). CPU GradScaler, the same class accelerate uses on CUDA."""
    from flowtrain.train.checkpoint import load_checkpoint, write_checkpoint

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for grad in ([1.0, float("inf"), 1.0, 1.0], [1.0] * 4, [2.0] * 4):  # an overflow halves the scale; then growth
        scaler.scale((p * torch.tensor(grad)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = scaler.state_dict()
    assert state["scale"] == 512.0 and state["_growth_tracker"] == 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ckpt = write_checkpoint(tmp_path, 3, trainable={"p": p}, optimizer=opt, lr_scheduler=sched, state={"step": 3},
                            scaler=scaler)  # fmt: skip
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(ckpt)["scaler"])
    assert restored.state_dict() == state
