"""Qwen-Image: the original layout is diffusers' own.

Qwen-Image was published in diffusers' layout (`QwenImageTransformer2DModel`), and ComfyUI's Qwen-Image model keeps
those module names: its `comfy/lora.py::model_lora_keys_unet` maps `diffusion_model.<name>`, `<name>` and
`transformer.<name>` LoRA keys straight onto them. diffusers 0.42.1 reads the same forms back with
`loaders/lora_conversion_utils.py::_convert_non_diffusers_qwen_lora_to_diffusers` (strips `diffusion_model.`,
applies `.alpha`). So nothing is renamed, fused or reordered; the formats differ only in prefix and key style.
"""

from __future__ import annotations

from flowtrain.export import Layout

LAYOUT = Layout(
    identity=True,
    sources=(
        "diffusers 0.42.1 `loaders/lora_conversion_utils.py::_convert_non_diffusers_qwen_lora_to_diffusers`",
        "ComfyUI `comfy/lora.py::model_lora_keys_unet` (QwenImage branch)",
    ),
)
