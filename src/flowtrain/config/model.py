"""The generic part of the `model:` section. Each family subclasses `ModelOptions` with its own keys (see
`flowtrain.models`); the config validates `model:` against the class of the family it names."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from flowtrain.config.section import Section


class ModelOptions(Section):
    """Keys every family has. A family's options class adds its own (text-encoder layers, guidance, ...)."""

    # The names of the family's `lora.targets` presets, so a config with a wrong one fails at load time (`check`),
    # not after the transformer loaded; the contract test holds them equal to `ModelFamily.lora_presets`.
    lora_presets: ClassVar[tuple[str, ...]] = ("attention", "attention+ff", "all")

    family: str = Field(
        ...,
        description="Model family (docs/models.md lists them). Optional in YAML: detected from "
        "model.pretrained's model_index.json when not set.",
    )
    pretrained: str = Field(..., description="Hub id or local folder of the diffusers pipeline.")
    dit: str | None = Field(
        None, description="Optional separate transformer weights: a diffusers folder or a .safetensors file."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model.pretrained.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="dtype of the frozen base weights (LoRA) or of the loaded weights (full); precompute runs the "
        "encoders in it and stores text embeddings in it.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom code from the model repository.")
    quantize: Literal["none", "int8", "float8", "nf4"] = Field(
        "none",
        description="Quantize the frozen base's block Linears for LoRA training (QLoRA-style; the adapter stays "
        "float32 and its file loads on the unquantized base): int8 / float8 weight-only through torchao (float8: "
        "CUDA only), nf4 through bitsandbytes (CUDA only). Needs train_mode: lora.",
    )
