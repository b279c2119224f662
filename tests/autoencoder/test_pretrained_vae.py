"""`model.pretrained` of an autoencoder config, for every family that trains a VAE: a VAE folder and a pipeline
folder (its vae/, what an autoencoder stage leaves) load the same weights; anything else is a clear error."""

from __future__ import annotations

import pytest
import torch

from flowtrain.autoencoder.config import AEModelConfig
from flowtrain.models import ModelPathError, get_family

FAMILIES = ("flux2_klein", "flux1", "qwen_image", "wan")


@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_is_a_vae_folder_or_a_pipeline_folder(name, tmp_path):
    family = get_family(name)
    torch.manual_seed(0)
    vae = family.build_autoencoder(AEModelConfig(block_out_channels=[8, 8, 16], norm_num_groups=4))
    vae.save_pretrained(tmp_path / "vae")  # config.json in the folder itself
    vae.save_pretrained(tmp_path / "stage" / "vae")  # a pipeline / autoencoder-stage folder
    want = vae.state_dict()
    for pretrained in (tmp_path / "vae", tmp_path / "stage"):
        got = family.build_autoencoder(AEModelConfig(pretrained=str(pretrained))).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), pretrained
        assert all(t.dtype == torch.float32 for t in got.values() if t.is_floating_point())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match=r"neither a VAE folder \(config.json\) nor a pipeline folder"):
        family.build_autoencoder(AEModelConfig(pretrained=str(tmp_path / "empty")))
    with pytest.raises(ModelPathError, match="no such file or folder"):
        family.build_autoencoder(AEModelConfig(pretrained=str(tmp_path / "missing")))
