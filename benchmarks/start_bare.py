"""The whole job without flowtrain, in one process: images + captions → VAE latents and text embeddings → LoRA
training → the LoRA file. The baseline `benchmarks/start.py` runs (as its own process) where the diffusers script
cannot run.

Same work as `flowtrain train CONFIG --from IMAGES`: every image decoded, scaled to cover and centre-cropped by the
pipeline's image processor, VAE-encoded; every caption through the pipeline's own `encode_prompt` (Klein's
hidden-state layers); the encoders freed before the transformer loads; then `bare.run` (the hand-written loop of
benchmarks/overhead.py: same LoRA targets, AdamW, clipping, σ / noise draws) and `save_lora_weights`. Nothing is
written between the stages, nothing is validated, nothing is logged: the strictest baseline.

    python benchmarks/start_bare.py --pipeline P --images DIR --out DIR [--steps 200 --resolution 32 ...]

Prints one JSON line: `first_step` (time.time() when the first optimizer step finished) and `step_s` (each step's
seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bare  # noqa: E402


def _images(folder: Path) -> tuple[list, list[str]]:
    from PIL import Image

    images, captions = [], []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
        captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return images, captions


def encode(pipeline: str, folder: Path, resolution: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(moments (N, 2C, h, w), text (N, L, D), BatchNorm stats) of every image and caption of `folder`."""
    from diffusers import Flux2KleinPipeline

    from flowtrain.models.common import resize_to_cover

    images, captions = _images(folder)
    pipe = Flux2KleinPipeline.from_pretrained(pipeline, transformer=None, dtype=torch.float32)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(
            [resize_to_cover(im, resolution) for im in images], height=resolution, width=resolution,
            resize_mode="crop",
        )  # fmt: skip
        dist = pipe.vae.encode(pixels).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float()
        text, _ = pipe.encode_prompt(captions, max_sequence_length=seq, text_encoder_out_layers=(9, 18, 27))
    bn = pipe.vae.bn
    norm = {"mean": bn.running_mean.float(), "std": torch.sqrt(bn.running_var.float() + pipe.vae.config.batch_norm_eps)}
    del pipe  # the encoders are not needed for training (freed by reference counting)
    return moments, text.float(), norm


def build(pipeline: str, moments, text, norm, *, rank: int, batch: int, lr: float) -> bare.BareSetup:
    """`bare.setup`, from tensors in memory instead of a cache."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from flowtrain.models.flux2_klein.family import LORA_PRESETS
    from flowtrain.models.flux2_klein.latents import latent_ids, text_ids, training_latents
    from flowtrain.train.perf import optimizer_kwargs

    torch.manual_seed(0)
    model = Flux2Transformer2DModel.from_pretrained(pipeline, subfolder="transformer", dtype=torch.float32)
    model.requires_grad_(False)
    targets = "|".join(f"(?:.*\\.)?(?:{p})" for p in LORA_PRESETS["attention"])
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    cast_training_params(model, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, **optimizer_kwargs(params))
    batches = []
    for start in range(0, len(moments) - batch + 1, batch):
        x0, h, w = training_latents(moments[start : start + batch], norm["mean"], norm["std"])
        batches.append((x0.contiguous(), text[start : start + batch]))
    return bare.BareSetup(model, params, optimizer, batches, latent_ids(batch, h, w), text_ids(batch, text.shape[1]),
                          autocast=False)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seq", type=int, default=32, help="max_sequence_length")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    moments, text, norm = encode(args.pipeline, args.images, args.resolution, args.seq)
    s = build(args.pipeline, moments, text, norm, rank=args.rank, batch=args.batch, lr=args.lr)
    start = time.time()
    step_s = bare.run(s, args.steps)
    Flux2KleinPipeline.save_lora_weights(str(args.out), transformer_lora_layers=get_peft_model_state_dict(s.model))
    print(json.dumps({"first_step": start + step_s[0], "step_s": step_s}))


if __name__ == "__main__":
    main()
