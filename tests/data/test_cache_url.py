"""The latent cache at an fsspec URL (`dataset.cache_dir: s3://...`): the same rows, losses and resume as a local
copy, read through pyarrow + fsspec in byte ranges. fsspec's `memory://` stands in for object storage (its store is
per process: DataLoader workers are forked and see what was uploaded before they started) and `file://` for a
filesystem that is reached through fsspec."""

from __future__ import annotations

import uuid

import fsspec
import pytest
import torch

from flowtrain.data.cache import CacheDataset
from flowtrain.data.fs import FsPath
from flowtrain.data.manifest import CacheError
from flowtrain.testing.training import assert_resume_exact
from flowtrain.testing.training import train_config as _cfg


def _upload(local, url: str) -> str:
    """A copy of the local cache folder at `url`."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{root}/{p.name}")
    return url


@pytest.fixture
def memory_cache(tiny_cache):
    url = _upload(tiny_cache[1], f"memory:///bucket-{uuid.uuid4().hex[:8]}/cache")
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)


def _rows(ds: CacheDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], torch.Tensor):
                assert ra[k].dtype == rb[k].dtype and torch.equal(ra[k], rb[k]), k
            else:
                assert ra[k] == rb[k], k


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_url_cache_rows_equal_local(tiny_cache, memory_cache, scheme):
    """Every row (and the empty prompt, the row-group layout) read from a URL equals the local cache's."""
    url = memory_cache if scheme == "memory" else f"file://{tiny_cache[1]}"
    local, remote = CacheDataset(tiny_cache[1]), CacheDataset(url)
    assert isinstance(remote.dir, FsPath) and str(remote.manifest.path) == f"{url}/manifest.json"
    assert remote.row_group_sizes() == local.row_group_sizes()
    _same_rows(_rows(remote), _rows(local))
    ea, eb = remote.empty_batch(), local.empty_batch()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_opening_a_url_cache_reads_footers_not_shards(tiny_cache, memory_cache, monkeypatch):
    """Opening a URL cache reads each shard's footer through a seekable fsspec file object (no download): the
    bytes read are a small part of the shards; a row read then fetches its row group."""
    read: list[int] = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    plain_open = FsPath.open
    monkeypatch.setattr(FsPath, "open", lambda self, mode="rb": Counting(plain_open(self, mode)))
    fs, root = fsspec.core.url_to_fs(memory_cache)
    shards = [p for p in fs.ls(root, detail=False) if p.endswith(".parquet")]
    shard_bytes = sum(fs.size(p) for p in shards)
    ds = CacheDataset(memory_cache)
    opened = sum(read)
    # pyarrow reads the last 64 KiB speculatively for the footer; the tiny cache's shard is ~120 KiB
    assert 0 < opened <= 64 * 1024 * len(shards) and opened < shard_bytes, (opened, shard_bytes)
    ds[0]
    assert sum(read) > opened


def test_training_from_url_cache_is_exact_and_resumes(tiny_pipeline_dir, tiny_cache, memory_cache, tmp_path):
    """The same run trained straight from the local cache == trained from the memory:// copy, stopped after 2
    steps and resumed from the URL: losses and final weights bitwise (the loader's order and position are the
    same whichever way the shards are read)."""
    extra = {"train": {"max_steps": 5, "caption_dropout": 0.3}}
    local = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "local", **extra)
    remote = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "url", **extra)
    remote.dataset.cache_dir = memory_cache
    assert_resume_exact(local, remote, stop=2)


def test_prior_preservation_from_url_caches(tiny_pipeline_dir, tiny_cache, memory_cache, tmp_path):
    """dataset.class_cache_dir at a URL too: the prior-preservation run's losses equal the local caches' bitwise."""
    from flowtrain.train.loop import train

    extra = {"train": {"max_steps": 2}, "loss": {"name": "prior_preservation", "prior_loss_weight": 0.5}}
    losses = []
    for name, cache in (("local", str(tiny_cache[1])), ("url", memory_cache)):
        cfg = _cfg(tiny_pipeline_dir, cache, tmp_path / name, dataset={"class_cache_dir": cache}, **extra)
        losses.append(train(cfg, progress=False).losses)
    assert sorted(losses[0]) == [1, 2] and losses[0] == losses[1]


def test_url_cache_with_worker_processes(tiny_cache, memory_cache):
    """dataset.num_workers > 0 with a memory:// cache: workers are forked after the upload, so each one sees the
    store's files and opens its own handles; the batches equal the local ones."""
    from torch.utils.data import DataLoader

    loaders = [
        DataLoader(ds, batch_size=2, num_workers=1, collate_fn=ds.collate)
        for ds in (CacheDataset(memory_cache), CacheDataset(tiny_cache[1]))
    ]
    for a, b in zip(*loaders, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # In another process than the one that opened it, the dataset makes its filesystem again from the URL (s3fs and
    # gcsfs instances refuse to be used after a fork); seen here by pretending to be in one.
    import os

    ds = CacheDataset(memory_cache)
    before, ds._pid = ds.dir, -1
    row = ds[3]
    assert ds._pid == os.getpid() and ds.dir is not before and str(ds.dir) == str(before)
    assert torch.equal(row["latent_moments"], CacheDataset(tiny_cache[1])[3]["latent_moments"])


def test_missing_or_incomplete_url_cache_says_what_to_run(tiny_cache, memory_cache):
    empty = f"memory:///nothing-{uuid.uuid4().hex[:8]}/cache"
    with pytest.raises(FileNotFoundError, match=rf"{empty}/manifest.json not found: run `flowtrain precompute"):
        CacheDataset(empty)
    fs, root = fsspec.core.url_to_fs(memory_cache)
    shard = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))[0]
    fs.rm_file(shard)
    with pytest.raises(CacheError, match=r"memory://.*\.parquet: listed in manifest.json but missing; rerun"):
        CacheDataset(memory_cache)


# ---- precompute --out URL ----------------------------------------------------------------------------------------


def _cli_args(raw, pipeline, url: str) -> list[str]:
    from flowtrain.testing.data import TINY_RES, TINY_SEQ

    return ["precompute", str(raw), "--model", str(pipeline), "--out", url, "--quiet", "--batch-size", "4",
            "--resolution", str(TINY_RES), f"model.max_sequence_length={TINY_SEQ}", "--dtype", "float32"]  # fmt: skip


@pytest.fixture
def url_out(monkeypatch, tmp_path):
    """A fresh memory:// URL, with the default staging folders under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = f"memory:///bucket-{uuid.uuid4().hex[:8]}/cache"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_precompute_out_url_equals_local_precompute(tiny_pipeline_dir, tiny_cache, url_out, capsys):
    """`precompute --out memory://...`: the uploaded cache reads row for row like the local one made with the same
    settings, its staging folder is gone, and a second run is refused (a finished cache) without --overwrite."""
    from flowtrain.cli import main
    from flowtrain.data.cache_remote import default_staging

    args = _cli_args(tiny_cache[0], tiny_pipeline_dir, url_out)
    assert main(args) == 0
    remote, local = CacheDataset(url_out), CacheDataset(tiny_cache[1])
    assert remote.manifest.fingerprint == local.manifest.fingerprint
    assert [s["rows"] for s in remote.manifest.shards] == [s["rows"] for s in local.manifest.shards]
    _same_rows(_rows(remote), _rows(local))
    assert not default_staging(url_out).exists()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {url_out} holds a finished latent cache" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    _same_rows(_rows(CacheDataset(url_out)), _rows(local))


def test_precompute_out_url_resumes_and_refuses_other_settings(tiny_pipeline_dir, tiny_cache, url_out, monkeypatch):
    """An upload killed before the manifest: the rerun encodes nothing again (the staged shards are reused) and
    uploads no shard again (the remote ones have the right rows); with the staging folder lost too, the shards are
    encoded again but still not uploaded again. A rerun with other settings is refused, naming the URL."""
    import flowtrain.data.cache_remote as cache_remote
    import flowtrain.data.precompute as pre
    from flowtrain.testing.data import TINY_RES, tiny_model

    model = tiny_model(tiny_pipeline_dir)
    opts = dict(resolution=TINY_RES, batch_size=4, rows_per_shard=4, progress=False)
    fs, root = fsspec.core.url_to_fs(url_out)
    written, uploaded, kill = [], [], [True]
    write, put = pre.write_shard, fs.put_file
    monkeypatch.setattr(pre, "write_shard", lambda table, path: (written.append(path.name), write(table, path)))

    def put_file(lpath, rpath, *a, **k):
        if rpath.endswith("/manifest.json") and kill:
            kill.clear()
            raise KeyboardInterrupt  # killed before the manifest went up
        uploaded.append(rpath.rsplit("/", 1)[-1])
        return put(lpath, rpath, *a, **k)

    monkeypatch.setattr(fs, "put_file", put_file)
    with pytest.raises(KeyboardInterrupt):
        cache_remote.precompute_to_url(tiny_cache[0], url_out, model, **opts)
    assert sorted(written) == ["cache-00000-0000.parquet", "cache-00000-0001.parquet"]
    assert not fs.exists(f"{root}/manifest.json") and cache_remote.default_staging(url_out).exists()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        CacheDataset(url_out)

    written.clear(), uploaded.clear()
    cache_remote.precompute_to_url(tiny_cache[0], url_out, model, **opts)
    assert written == [] and not any(name.endswith(".parquet") for name in uploaded)
    assert len(CacheDataset(url_out)) == 8

    fs.rm_file(f"{root}/manifest.json")  # killed again, and this time the staging folder is lost as well
    written.clear(), uploaded.clear()
    cache_remote.precompute_to_url(tiny_cache[0], url_out, model, **opts)
    assert len(written) == 2 and not any(name.endswith(".parquet") for name in uploaded)
    _same_rows(_rows(CacheDataset(url_out)), _rows(CacheDataset(tiny_cache[1])))

    fs.rm_file(f"{root}/manifest.json")
    with pytest.raises(ValueError, match=rf"--out {url_out}: .* holds a cache made with different settings"):
        cache_remote.precompute_to_url(tiny_cache[0], url_out, model, **{**opts, "resolution": 2 * TINY_RES})


def test_train_from_images_with_a_url_cache(tiny_pipeline_dir, url_out, tmp_path, monkeypatch, capsys):
    """`train CONFIG --from SRC` with dataset.cache_dir at a URL: raw shards go next to it (URL + '-raw'), the cache
    is uploaded, the run trains from it; a second run reuses both stages."""
    import yaml

    from flowtrain.cli import main
    from flowtrain.testing.data import TINY_RES, TINY_SEQ, make_image_folder

    make_image_folder(tmp_path / "src", n=4)
    cfg = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"},
        "dataset": {"cache_dir": url_out},
        "train": {"batch_size": 2, "learning_rate": 2e-3, "mixed_precision": "no", "max_steps": 2},
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": None},
        "tracking": {"report_to": ["jsonl"], "graphs": False},
        "output_dir": "runs/a",
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    chain = ["train", "tiny.yaml", "--from", "src", "--resolution", str(TINY_RES), "--quiet"]
    assert main(chain) == 0, capsys.readouterr().err
    fs, root = fsspec.core.url_to_fs(url_out)
    assert fs.exists(f"{root}-raw/manifest.json") and len(CacheDataset(url_out)) == 4
    assert (tmp_path / "runs" / "a" / "pytorch_lora_weights.safetensors").exists()
    capsys.readouterr()
    assert main([*chain, "--output_dir", "runs/b"]) == 0
    out = capsys.readouterr().out
    assert f"prepare: reusing {url_out}-raw" in out and f"precompute: reusing {url_out}" in out
    if fs.exists(f"{root}-raw"):
        fs.rm(f"{root}-raw", recursive=True)


@pytest.mark.slow
@pytest.mark.dist
def test_precompute_to_url_on_two_processes(tiny_pipeline_dir, tiny_cache, tmp_path):
    """`accelerate launch` (2 CPU processes) `precompute --out file://...`: both ranks encode into the shared
    staging folder, the main rank uploads once, and the rows are the one-process cache's in order."""

    import yaml

    from flowtrain.testing.data import TINY_RES, tiny_config_dict
    from flowtrain.testing.launch import accelerate_launch, cpu_env, ddp_args, run

    config = tmp_path / "precompute.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_pipeline_dir, tmp_path / "unused", tmp_path / "run")))
    url = f"file://{tmp_path}/bucket/cache"
    precompute = ["-m", "flowtrain", "precompute", str(tiny_cache[0]), "--config", str(config), "--out", url]
    precompute += ["--resolution", str(TINY_RES), "--batch-size", "4", "--staging", str(tmp_path / "staging")]
    env = cpu_env({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    outputs = run(accelerate_launch([*ddp_args(2, 29617), *precompute]), env, 900)
    assert outputs.count(f"precompute: 8 rows → {url}") == 1 and outputs.count("precompute: uploaded") == 1
    assert not (tmp_path / "staging").exists()
    got, want = CacheDataset(url), CacheDataset(tiny_cache[1])
    assert got.manifest.fingerprint == want.manifest.fingerprint and len(got) == len(want)
    # The launched ranks run one intra-op thread and the session cache was encoded with more (other kernels, so
    # other low bits; tests/dist/test_precompute_dist.py compares bitwise against a one-thread run): the same rows
    # to float32 rounding is what this test needs to show the upload is whole and in order.
    for a, b in zip(_rows(got), _rows(want), strict=True):
        assert a.keys() == b.keys() and a["index"] == b["index"]
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a if isinstance(a[k], torch.Tensor))
