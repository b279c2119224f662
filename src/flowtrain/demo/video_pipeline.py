"""The video demo's step between its two trainings, a `kind: python` stage of configs/demo/video_pipeline.yaml.

After the `vae` stage has trained the `AutoencoderKLWan`, `assemble_and_precompute` writes a `WanPipeline` folder
with that VAE, a tiny random UMT5 encoder and tokenizer (`flowtrain.models.wan.tiny`), a randomly initialised
`WanTransformer3DModel` of the stage's size and Wan's UniPC flow scheduler, then encodes the prepared clips into the
5-D latent cache the `dit` stage trains on (the product's `precompute`, cut as the base config's `dataset.video`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowtrain.config.stages import STAGES_DIR


def build_wan_pipeline(vae_dir: Path, args: dict[str, Any], seed: int = 0) -> Any:
    """`WanPipeline` of the trained VAE + tiny random text encoder + random transformer. `args` keys (all
    optional): text_hidden, text_layers, layers, heads, head_dim, flow_shift."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from flowtrain.models.wan import tiny

    vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    spec = tiny.TinySpec(
        te_hidden=args.get("text_hidden", 32),
        te_layers=args.get("text_layers", 2),
        z_dim=vae.config.z_dim,
        dit_layers=args.get("layers", 2),
        dit_heads=args.get("heads", 2),
        dit_head_dim=args.get("head_dim", 12),
    )
    parts = tiny.build_components(spec, seed)
    torch.manual_seed(seed)
    parts["vae"] = vae
    parts["transformer"] = tiny.build_transformer(spec)  # in/out channels = the trained VAE's z_dim
    # Wan's scheduler, with the flow shift for a sequence of a few dozen tokens rather than 32,760 (shift 1: none)
    parts["scheduler"] = UniPCMultistepScheduler(**{**tiny.SCHEDULER_CONFIG, "flow_shift": args.get("flow_shift", 1.0)})
    return WanPipeline(**parts)


def assemble_and_precompute(cfg: Any, stage_dir: Path, args: dict[str, Any], *, progress: bool = True) -> dict:
    """args: `vae_stage` (the autoencoder stage's name), `raw_dir` (prepared clips), `resolution`, `batch_size`
    (precompute), `pipeline` (`build_wan_pipeline`'s args). Writes `{stage_dir}/pipeline` and `{stage_dir}/cache`,
    which must be the base config's model.pretrained and dataset.cache_dir."""
    from flowtrain.data.precompute import precompute

    pipe_dir, cache = stage_dir / "pipeline", stage_dir / "cache"
    for key, got, want in (("model.pretrained", cfg.model.pretrained, pipe_dir),
                           ("dataset.cache_dir", cfg.dataset.cache_dir, cache)):  # fmt: skip
        if Path(got).resolve() != want.resolve():
            raise ValueError(f"{key} is {got}, but this stage writes {want}: set {key}: {want}")
    vae = Path(cfg.output_dir) / STAGES_DIR / args["vae_stage"] / "vae"
    pipe = build_wan_pipeline(vae, args.get("pipeline", {}), seed=cfg.train.seed)
    pipe.save_pretrained(pipe_dir)
    precompute(args["raw_dir"], cache, cfg.model, resolution=args["resolution"], batch_size=args["batch_size"],
               progress=progress, video=cfg.dataset.video)  # fmt: skip
    return {"pipeline": str(pipe_dir), "cache": str(cache)}
