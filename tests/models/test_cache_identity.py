"""Which cache fits which model: compared by what identifies the encoders and the VAE (config and weights digests,
computed once at precompute), not by the model's path. One check, `ModelFamily.check_cache`, serves the instance
cache, the class cache and the transformer."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from flowtrain.data.manifest import CacheError, CacheManifest
from flowtrain.models import get_family
from flowtrain.models.common import component_identity, weights_digest
from flowtrain.testing.data import tiny_model
from flowtrain.testing.training import train_config
from flowtrain.train.loop import train


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    """The same tiny architecture with other random weights: what a different checkpoint of one model looks like."""
    from flowtrain.models.flux2_klein.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("other") / "pipeline", seed=1)


def test_identity_follows_the_files_not_the_path(tiny_pipeline_dir, other_pipeline, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_pipeline_dir, moved)
    family = get_family("flux2_klein")
    same = family.identity(tiny_model(tiny_pipeline_dir))
    assert set(same) == {"text_encoder", "tokenizer", "vae"}
    assert family.identity(tiny_model(moved)) == same  # a moved folder is the same model
    other = family.identity(tiny_model(other_pipeline))
    assert other["vae"] != same["vae"] and other["text_encoder"] != same["text_encoder"]
    assert component_identity("org/not-downloaded", ["vae"]) == {}  # nothing local to compare: left out


def test_weights_digest_samples_large_files(tmp_path):
    big = tmp_path / "w.bin"
    data = bytearray(80 << 20)  # 80 MiB: above the whole-file limit, so windows are sampled
    big.write_bytes(data)
    first = weights_digest(big)
    size, window = len(data), 1 << 20
    data[8 * (size - window) // 15 + 123] = 1  # a byte inside one of the 16 sampled windows
    big.write_bytes(data)
    assert weights_digest(big) != first
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1000))
    before = weights_digest(small)
    small.write_bytes(bytes(999) + b"\x01")  # small files are hashed whole: any byte counts
    assert weights_digest(small) != before


def test_a_cache_made_by_another_model_is_refused(tiny_pipeline_dir, tiny_cache, other_pipeline, tmp_path, caplog):
    """The whole manifest swapped in, or a cache made from other weights at the same path: refused, naming the
    components; `dataset.allow_other_weights` turns it into a warning; a moved model folder just works."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache[1], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    fam = get_family("flux2_klein")
    manifest["fingerprint"]["identity"] = fam.identity(tiny_model(other_pipeline))
    manifest["fingerprint"]["model"] = str(other_pipeline)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    cfg = train_config(tiny_pipeline_dir, cache, tmp_path / "r", train={"max_steps": 1})
    with pytest.raises(CacheError, match="other weights.*text_encoder.*vae.*allow_other_weights"):
        train(cfg, progress=False)
    cfg.dataset.allow_other_weights = True
    with caplog.at_level(logging.WARNING):
        assert train(cfg, progress=False).step == 1
    assert "text_encoder, vae differ" in caplog.text  # allowed, but said

    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_pipeline_dir, moved)
    assert train(train_config(moved, tiny_cache[1], tmp_path / "m", train={"max_steps": 1}), progress=False).step == 1


def test_check_cache_names_the_setting_that_differs(tiny_pipeline_dir, tiny_cache):
    fam = get_family("flux2_klein")
    manifest = CacheManifest.read(tiny_cache[1])
    fam.check_cache(tiny_model(tiny_pipeline_dir), manifest)
    with pytest.raises(CacheError, match=r"text_encoder_layers=\[9, 18, 27\] \(config: \[3, 27\]\).*Re-run precompute"):
        fam.check_cache(tiny_model(tiny_pipeline_dir, text_encoder_layers=[3, 27]), manifest)
    manifest.family = "another_family"
    with pytest.raises(CacheError, match="made for model family 'another_family'"):
        fam.check_cache(tiny_model(tiny_pipeline_dir), manifest)
