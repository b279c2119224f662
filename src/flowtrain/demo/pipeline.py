"""The demo's step between its two trainings, as a `kind: python` stage of configs/demo/pipeline.yaml.

After the `vae` stage has trained the autoencoder, `assemble_and_precompute` writes a Klein pipeline folder with
that VAE, a tiny random Qwen3 and a randomly initialised transformer (`flux2_klein.scratch`), and encodes the
prepared digits into the latent cache the `dit` stage trains on. Demo-specific (it assembles a Klein pipeline
from scratch), which is why it is a python stage the config names rather than a stage kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowtrain.config.stages import STAGES_DIR


def check_prompts_distinct(pipeline_dir: Path, prompts: list[str], max_sequence_length: int) -> None:
    """The Klein prompt path (chat template, truncation to max_sequence_length) must keep prompts apart."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    seen: dict[tuple[int, ...], str] = {}
    for p in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        ids = tuple(tok(text, truncation=True, max_length=max_sequence_length)["input_ids"])
        if ids in seen:
            raise ValueError(
                f"prompts {seen[ids]!r} and {p!r} are identical after truncation to model.max_sequence_length="
                f"{max_sequence_length} tokens: raise it in the training config"
            )
        seen[ids] = p


def assemble_and_precompute(cfg: Any, stage_dir: Path, args: dict[str, Any], *, progress: bool = True) -> dict:
    """args: `vae_stage` (the autoencoder stage's name), `raw_dir` (prepared digits), `resolution`,
    `batch_size` (precompute), `caption_template` (to check the ten prompts stay distinct), `pipeline` (a
    `ScratchPipelineConfig` mapping). Writes `{stage_dir}/pipeline` and `{stage_dir}/cache`, which must be the
    base config's model.pretrained and dataset.cache_dir (the transformer stage trains there)."""
    from flowtrain.data.precompute import precompute
    from flowtrain.demo.digits import caption_for
    from flowtrain.models.flux2_klein.scratch import ScratchPipelineConfig, assemble_pipeline

    pipe, cache = stage_dir / "pipeline", stage_dir / "cache"
    for key, want in (("model.pretrained", pipe), ("dataset.cache_dir", cache)):
        got = cfg.model.pretrained if key == "model.pretrained" else cfg.dataset.cache_dir
        if Path(got).resolve() != want.resolve():
            raise ValueError(f"{key} is {got}, but this stage writes {want}: set {key}: {want}")
    vae = Path(cfg.output_dir) / STAGES_DIR / args["vae_stage"] / "vae"
    assemble_pipeline(pipe, vae, ScratchPipelineConfig(**args.get("pipeline", {})), cfg.model.text_encoder_layers)
    prompts = [caption_for(d, args["caption_template"]) for d in range(10)]
    check_prompts_distinct(pipe, prompts, cfg.model.max_sequence_length)
    precompute(args["raw_dir"], cache, cfg.model, resolution=args["resolution"], batch_size=args["batch_size"],
               progress=progress)  # fmt: skip
    return {"pipeline": str(pipe), "cache": str(cache)}
