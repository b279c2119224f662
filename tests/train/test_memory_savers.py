"""Memory savers (`flowtrain.train.offload`): checkpointing levels and block swap leave fp32 numerics bitwise
unchanged through the real training loop, checkpoint the blocks they say, and swap blocks in the order they say.

The tiny Klein transformer has 3 repeated blocks: one double-stream block, then two single-stream ones.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from flowtrain.testing.training import train_config
from flowtrain.track import read_metrics
from flowtrain.train import offload
from flowtrain.train.loop import train

STEPS = 3
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


def _run(pipeline, cache, out, **train_opts):
    cfg = train_config(pipeline, cache, out, train={"max_steps": STEPS, **train_opts})
    result = train(cfg, progress=False)
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    weights = load_file(out / f"checkpoint-{STEPS}" / "trainable.safetensors")
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], weights, result


@pytest.fixture(scope="module")
def baseline(tiny_pipeline_dir, tiny_cache, tmp_path_factory):
    """The same run with no memory saver."""
    return _run(tiny_pipeline_dir, tiny_cache[1], tmp_path_factory.mktemp("base") / "run")


def _assert_same(got, want):
    losses, norms, weights, _ = got
    assert losses == want[0]  # bitwise: float equality of the logged fp32 values
    assert norms == want[1]
    assert weights.keys() == want[2].keys()
    for k in weights:
        assert torch.equal(weights[k], want[2][k]), k


def _count_forwards(monkeypatch) -> dict[str, int]:
    """Forward calls per block, counted by hooks put on as checkpointing is enabled (the real function runs)."""
    counts: dict[str, int] = {}
    real = offload.enable_checkpointing

    def spy(model, value, swapped=0):
        chosen = real(model, value, swapped=swapped)
        for name, block in offload.transformer_blocks(model):
            counts[name] = 0
            # a pre-hook: torch's recomputation stops as soon as it has the tensors backward needs, before a
            # forward (post-)hook would run
            block.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1))
        return chosen

    monkeypatch.setattr(offload, "enable_checkpointing", spy)
    return counts


@pytest.mark.parametrize(
    ("level", "swap", "checkpointed"),
    [
        (True, 0, BLOCKS),
        ("every:2", 0, [BLOCKS[0], BLOCKS[2]]),
        ("single", 0, BLOCKS[1:]),
        (False, 1, BLOCKS[2:]),  # a swapped block is always checkpointed
        ("every:2", 2, BLOCKS),
    ],
)
def test_checkpointing_level_is_exact_and_recomputes_its_blocks(
    tiny_pipeline_dir, tiny_cache, tmp_path, baseline, monkeypatch, level, swap, checkpointed
):
    counts = _count_forwards(monkeypatch)
    got = _run(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", gradient_checkpointing=level, blocks_to_swap=swap)
    _assert_same(got, baseline)
    # a checkpointed block runs forward twice a step (the recomputation in backward), the others once
    assert counts == {b: STEPS * (2 if b in checkpointed else 1) for b in BLOCKS}


def _traced_swap(monkeypatch) -> list:
    """The BlockSwap the run builds, made with a trace (the real class, through run.py's call)."""
    made = []
    from flowtrain.train import run as run_module

    def install(model, n, accelerator):
        offload.check_swap_engine(accelerator)
        made.append(offload.BlockSwap(model, n, accelerator.device, trace=[]))
        return made[-1]

    monkeypatch.setattr(run_module, "install_block_swap", install)
    return made


def _replay(trace: list[tuple[str, int]]) -> int:
    """Check every forward / backward of a swapped block runs with its weights in place ("ready", not only a copy
    started); returns the most blocks on the device (ready or on their way) at once."""
    loaded, ready, most = set(), set(), 0
    for event, i in trace:
        if event == "load":
            assert i not in loaded, trace
            loaded.add(i)
        elif event == "ready":
            assert i in loaded, trace
            ready.add(i)
        elif event == "drop":
            loaded.remove(i)
            ready.remove(i)
        else:
            assert i in ready, (event, i, trace)
        most = max(most, len(loaded))
    return most


@pytest.mark.parametrize(("n", "level"), [(1, False), (3, False), (2, True)])
def test_block_swap_is_exact_and_swaps_in_order(
    tiny_pipeline_dir, tiny_cache, tmp_path, baseline, monkeypatch, n, level
):
    made = _traced_swap(monkeypatch)
    got = _run(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", blocks_to_swap=n, gradient_checkpointing=level)
    _assert_same(got, baseline)
    (swap,) = made
    trace = swap.trace
    # per step: the swapped blocks forward in order, then backward in reverse order
    runs = [i for e, i in trace if e in ("forward", "backward")]
    assert runs == (list(range(n)) + list(range(n))[::-1]) * STEPS
    assert _replay(trace) <= 2  # the block running and the one prefetched
    assert swap.peak_bytes <= swap.fixed_bytes + 2 * max(swap.block_bytes)
    # the LoRA weights of the swapped blocks are trainable and were never swapped
    model = got[3].transformer
    swapped = {id(p) for pairs in swap.masters for p, _ in pairs}
    assert swapped and not any(p.requires_grad for p in model.parameters() if id(p) in swapped)


def test_checkpointing_values_are_validated(tiny_pipeline_dir, tiny_cache, tmp_path):
    for bad in ("every:0", "every", "some", 3):
        with pytest.raises(ValidationError, match="every:K"):
            train_config(tiny_pipeline_dir, tiny_cache[1], tmp_path, train={"gradient_checkpointing": bad})
    assert offload.parse_checkpointing("every:3") == offload.Checkpointing("every", 3)
    assert offload.parse_checkpointing(False).kind == "none" and offload.parse_checkpointing(True).kind == "all"


def test_single_level_needs_single_blocks(tiny_pipeline_dir):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir / "transformer")
    blocks = offload.transformer_blocks(model)
    assert [n for n, _ in blocks] == BLOCKS
    with pytest.raises(ValueError, match="no single-stream blocks"):
        offload.checkpointed_blocks(blocks[:1], offload.Checkpointing("single"))
    with pytest.raises(ValueError, match="has 3 blocks"):
        offload.BlockSwap(model, 4, "cpu")


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"train_mode": "full"}, "needs train_mode=lora"), ({"train": {"compile": True}}, "train.compile")],
)
def test_block_swap_refusals(tiny_pipeline_dir, tiny_cache, tmp_path, extra, match):
    sections = {"train": {"blocks_to_swap": 1, **extra.pop("train", {})}, **extra}
    with pytest.raises(ValidationError, match=match):
        train_config(tiny_pipeline_dir, tiny_cache[1], tmp_path, **sections)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the real host/device moves need CUDA")


@pytest.mark.cuda
@needs_cuda
def test_block_swap_moves_weights_on_cuda(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    """On a GPU the copies, side stream and events are real: the numbers still equal a run without block swap
    (deterministic algorithms on both), every block runs with its weights in place, and after the run the swapped
    frozen weights are back in pinned CPU memory while the LoRA weights stayed on the GPU."""
    plain = _run(tiny_pipeline_dir, tiny_cache[1], tmp_path / "plain", deterministic=True)
    made = _traced_swap(monkeypatch)
    got = _run(tiny_pipeline_dir, tiny_cache[1], tmp_path / "swap", deterministic=True, blocks_to_swap=3,
               gradient_checkpointing=True)  # fmt: skip
    _assert_same(got, plain)
    (swap,) = made
    assert swap.cuda and _replay(swap.trace) <= 2
    for p, cpu in swap.masters[-1]:
        assert p.device.type == "cpu" and p.data_ptr() == cpu.data_ptr() and cpu.is_pinned()
    lora = [p for _, m in offload.transformer_blocks(got[3].transformer) for p in m.parameters() if p.requires_grad]
    assert lora and all(p.device.type == "cuda" for p in lora)
