"""FLUX.2 Klein: diffusers' `Flux2Transformer2DModel` names → the original (BFL) FLUX.2 layout that ComfyUI loads.

Sources (diffusers 0.42.1): `loaders/single_file_utils.py::convert_flux2_transformer_checkpoint_to_diffusers`
(original → diffusers for whole checkpoints: the renames, `qkv` chunked in three, the final modulation's halves
swapped) and `loaders/lora_conversion_utils.py::_convert_non_diffusers_flux2_lora_to_diffusers` (the same names for
LoRAs). This table is their inverse. Single blocks need no fusion: diffusers keeps BFL's fused `linear1` as
`attn.to_qkv_mlp_proj` (q ‖ k ‖ v ‖ MLP-in rows, in BFL's order) and `linear2` as `attn.to_out`.
"""

from __future__ import annotations

from flowtrain.export import Layout, ModuleMap, double_block_qkv


def _qkv(width: int) -> tuple[int, int, int]:
    # q, k and v each project the hidden width to heads·head_dim, which equals the hidden width in FLUX.2.
    return (width, width, width)


LAYOUT = Layout(
    modules=(
        *double_block_qkv(_qkv),
        ModuleMap(("transformer_blocks.{i}.attn.to_out.0",), "double_blocks.{i}.img_attn.proj"),
        ModuleMap(("transformer_blocks.{i}.attn.to_add_out",), "double_blocks.{i}.txt_attn.proj"),
        ModuleMap(("transformer_blocks.{i}.ff.linear_in",), "double_blocks.{i}.img_mlp.0"),
        ModuleMap(("transformer_blocks.{i}.ff.linear_out",), "double_blocks.{i}.img_mlp.2"),
        ModuleMap(("transformer_blocks.{i}.ff_context.linear_in",), "double_blocks.{i}.txt_mlp.0"),
        ModuleMap(("transformer_blocks.{i}.ff_context.linear_out",), "double_blocks.{i}.txt_mlp.2"),
        ModuleMap(("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",), "single_blocks.{i}.linear1"),
        ModuleMap(("single_transformer_blocks.{i}.attn.to_out",), "single_blocks.{i}.linear2"),
        ModuleMap(("x_embedder",), "img_in"),
        ModuleMap(("context_embedder",), "txt_in"),
        ModuleMap(("time_guidance_embed.timestep_embedder.linear_1",), "time_in.in_layer"),
        ModuleMap(("time_guidance_embed.timestep_embedder.linear_2",), "time_in.out_layer"),
        ModuleMap(("time_guidance_embed.guidance_embedder.linear_1",), "guidance_in.in_layer"),
        ModuleMap(("time_guidance_embed.guidance_embedder.linear_2",), "guidance_in.out_layer"),
        ModuleMap(("double_stream_modulation_img.linear",), "double_stream_modulation_img.lin"),
        ModuleMap(("double_stream_modulation_txt.linear",), "double_stream_modulation_txt.lin"),
        ModuleMap(("single_stream_modulation.linear",), "single_stream_modulation.lin"),
        ModuleMap(("proj_out",), "final_layer.linear"),
        ModuleMap(
            ("norm_out.linear",),
            "final_layer.adaLN_modulation.1",
            "swap",
            note="rows (scale, shift) in diffusers, (shift, scale) in BFL",
        ),
    ),
    params={
        "transformer_blocks.{i}.attn.norm_q.weight": "double_blocks.{i}.img_attn.norm.query_norm.scale",
        "transformer_blocks.{i}.attn.norm_k.weight": "double_blocks.{i}.img_attn.norm.key_norm.scale",
        "transformer_blocks.{i}.attn.norm_added_q.weight": "double_blocks.{i}.txt_attn.norm.query_norm.scale",
        "transformer_blocks.{i}.attn.norm_added_k.weight": "double_blocks.{i}.txt_attn.norm.key_norm.scale",
        "single_transformer_blocks.{i}.attn.norm_q.weight": "single_blocks.{i}.norm.query_norm.scale",
        "single_transformer_blocks.{i}.attn.norm_k.weight": "single_blocks.{i}.norm.key_norm.scale",
    },
    sources=(
        "diffusers 0.42.1 `loaders/single_file_utils.py::convert_flux2_transformer_checkpoint_to_diffusers`",
        "diffusers 0.42.1 `loaders/lora_conversion_utils.py::_convert_non_diffusers_flux2_lora_to_diffusers`",
    ),
)
