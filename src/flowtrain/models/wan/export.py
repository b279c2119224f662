"""Wan: diffusers' `WanTransformer3DModel` names → the original Wan layout (Wan-Video's `WanModel`, the names
ComfyUI and the model makers' checkpoints use: `blocks.{i}.self_attn.q`, `cross_attn.*`, `ffn.0/2`, `head.head`).

Source (diffusers 0.42.1): `loaders/single_file_utils.py::convert_wan_transformer_to_diffusers` (original →
diffusers; this table is its inverse, and tests/models/wan/test_export.py runs that converter on the export). Every
module maps one to one: nothing is fused or reordered. Two quirks: diffusers' `norm2` (the affine LayerNorm before
cross-attention) is the original `norm3` (the converter swaps the names), and the AdaLN tables `scale_shift_table`
are the original `modulation` parameters.
"""

from __future__ import annotations

from flowtrain.export import Layout, ModuleMap

_B = "blocks.{i}"


def _attention(diffusers: str, original: str) -> list[ModuleMap]:
    names = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
    return [ModuleMap((f"{_B}.{diffusers}.{d}",), f"{_B}.{original}.{o}") for d, o in names.items()]


LAYOUT = Layout(
    modules=(
        *_attention("attn1", "self_attn"),
        *_attention("attn2", "cross_attn"),
        ModuleMap((f"{_B}.ffn.net.0.proj",), f"{_B}.ffn.0"),
        ModuleMap((f"{_B}.ffn.net.2",), f"{_B}.ffn.2"),
        ModuleMap(("condition_embedder.time_embedder.linear_1",), "time_embedding.0"),
        ModuleMap(("condition_embedder.time_embedder.linear_2",), "time_embedding.2"),
        ModuleMap(("condition_embedder.text_embedder.linear_1",), "text_embedding.0"),
        ModuleMap(("condition_embedder.text_embedder.linear_2",), "text_embedding.2"),
        ModuleMap(("condition_embedder.time_proj",), "time_projection.1"),
        ModuleMap(("proj_out",), "head.head"),
    ),
    params={
        f"{_B}.attn1.norm_q.weight": f"{_B}.self_attn.norm_q.weight",
        f"{_B}.attn1.norm_k.weight": f"{_B}.self_attn.norm_k.weight",
        f"{_B}.attn2.norm_q.weight": f"{_B}.cross_attn.norm_q.weight",
        f"{_B}.attn2.norm_k.weight": f"{_B}.cross_attn.norm_k.weight",
        f"{_B}.norm2.weight": f"{_B}.norm3.weight",
        f"{_B}.norm2.bias": f"{_B}.norm3.bias",
        f"{_B}.scale_shift_table": f"{_B}.modulation",
        "scale_shift_table": "head.modulation",
        "patch_embedding.weight": "patch_embedding.weight",
        "patch_embedding.bias": "patch_embedding.bias",
    },
    sources=("diffusers 0.42.1 `loaders/single_file_utils.py::convert_wan_transformer_to_diffusers`",),
)
