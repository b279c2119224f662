"""FLUX.1: diffusers' `FluxTransformer2DModel` names → the original (BFL) FLUX.1 layout that ComfyUI loads.

Source (diffusers 0.42.1): `loaders/single_file_utils.py::convert_flux_transformer_checkpoint_to_diffusers`
(original → diffusers; this table is its inverse) and, for LoRAs, the sd-scripts branch of
`loaders/lora_conversion_utils.py::_convert_kohya_flux_lora_to_diffusers`, which splits the same fused modules:
double blocks' `img_attn.qkv` / `txt_attn.qkv` into q, k, v; single blocks' `linear1` into q, k, v and the MLP input
`proj_mlp` (rows q ‖ k ‖ v ‖ mlp, mlp = 4 × the hidden width); `final_layer.adaLN_modulation.1` with its halves
swapped.
"""

from __future__ import annotations

from flowtrain.export import Layout, ModuleMap, double_block_qkv


def _qkv(width: int) -> tuple[int, int, int]:
    # q, k, v project the hidden width to heads·head_dim, which is the hidden width in FLUX.1
    return (width, width, width)


def _linear1(width: int) -> tuple[int, int, int, int]:
    # q, k, v, then the MLP input: diffusers' FluxSingleTransformerBlock uses mlp_ratio 4.0 (as BFL's FLUX.1)
    return (width, width, width, 4 * width)


_S = "single_transformer_blocks.{i}"
LAYOUT = Layout(
    modules=(
        *double_block_qkv(_qkv),
        ModuleMap(("transformer_blocks.{i}.attn.to_out.0",), "double_blocks.{i}.img_attn.proj"),
        ModuleMap(("transformer_blocks.{i}.attn.to_add_out",), "double_blocks.{i}.txt_attn.proj"),
        ModuleMap(("transformer_blocks.{i}.ff.net.0.proj",), "double_blocks.{i}.img_mlp.0"),
        ModuleMap(("transformer_blocks.{i}.ff.net.2",), "double_blocks.{i}.img_mlp.2"),
        ModuleMap(("transformer_blocks.{i}.ff_context.net.0.proj",), "double_blocks.{i}.txt_mlp.0"),
        ModuleMap(("transformer_blocks.{i}.ff_context.net.2",), "double_blocks.{i}.txt_mlp.2"),
        ModuleMap(("transformer_blocks.{i}.norm1.linear",), "double_blocks.{i}.img_mod.lin"),
        ModuleMap(("transformer_blocks.{i}.norm1_context.linear",), "double_blocks.{i}.txt_mod.lin"),
        ModuleMap(
            (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp"),
            "single_blocks.{i}.linear1",
            "fuse",
            _linear1,
        ),
        ModuleMap((f"{_S}.proj_out",), "single_blocks.{i}.linear2"),
        ModuleMap((f"{_S}.norm.linear",), "single_blocks.{i}.modulation.lin"),
        ModuleMap(("x_embedder",), "img_in"),
        ModuleMap(("context_embedder",), "txt_in"),
        ModuleMap(("time_text_embed.timestep_embedder.linear_1",), "time_in.in_layer"),
        ModuleMap(("time_text_embed.timestep_embedder.linear_2",), "time_in.out_layer"),
        ModuleMap(("time_text_embed.guidance_embedder.linear_1",), "guidance_in.in_layer"),
        ModuleMap(("time_text_embed.guidance_embedder.linear_2",), "guidance_in.out_layer"),
        ModuleMap(("time_text_embed.text_embedder.linear_1",), "vector_in.in_layer"),
        ModuleMap(("time_text_embed.text_embedder.linear_2",), "vector_in.out_layer"),
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
        f"{_S}.attn.norm_q.weight": "single_blocks.{i}.norm.query_norm.scale",
        f"{_S}.attn.norm_k.weight": "single_blocks.{i}.norm.key_norm.scale",
    },
    sources=(
        "diffusers 0.42.1 `loaders/single_file_utils.py::convert_flux_transformer_checkpoint_to_diffusers`",
        "diffusers 0.42.1 `loaders/lora_conversion_utils.py::_convert_kohya_flux_lora_to_diffusers`",
    ),
)
