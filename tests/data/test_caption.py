"""`flowtrain caption`: a tiny random BLIP built offline and loaded through `from_pretrained` (the path real weights
take by name) captions only what has no caption, with the trigger template, in sidecars or a JSONL, and resumes.
A tiny random chat VLM (LLaVA-NeXT: a chat template, prompts whose length depends on the image) covers the chat
path: the template is applied and left padding makes a batched caption the one each image gets alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowtrain.caption import Captioner, caption_source, compose
from flowtrain.data.prepare import prepare

WORDS = ["a", "the", "photo", "of", "cat", "dog", "bird", "red", "blue", "green", "on", "grass", "sky", "tree", "house"]


def save_tiny_blip(folder: Path) -> Path:
    """A randomly initialised BlipForConditionalGeneration (~30k parameters) with its processor, saved like a Hub
    checkpoint. Random weights: its captions are word salad, which is all the mechanics need."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=vocab["[DEC]"], pad_token_id=0,
                sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32))
    # Never end early and never emit special tokens, so every caption has words in it (a random model would).
    special = [[vocab[t]] for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[DEC]")]
    model.generation_config.update(min_new_tokens=4, bad_words_ids=special)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_vlm(folder: Path) -> Path:
    """A randomly initialised LlavaNextForConditionalGeneration (~50k parameters: a one-layer CLIP vision tower, a
    one-layer Qwen2 decoder) with a LlavaNextProcessor that has a chat template, saved like a Hub checkpoint.

    LLaVA-NeXT because its processor needs no torchvision (Qwen2-VL's video processor does) and, as with
    Qwen2.5-VL, the number of image tokens follows the image's size and aspect ratio: prompts in one batch differ
    in length, so a batch is padded and left padding is what keeps each row's caption its own. The tokenizer is
    the tiny byte-level BPE the Qwen-Image tests train offline, plus `<image>`."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from flowtrain.models.qwen_image.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ids = tok.convert_tokens_to_ids
    pins = [[28, 28], [28, 56], [56, 28]]  # 1x1, 1x2 and 2x1 tiles of 28 px: 4 patches of 14 px each
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pins
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                   patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=ids("<|endoftext|>"),
                eos_token_id=ids("<|im_end|>"))  # fmt: skip
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                             image_grid_pinpoints=pins, vision_feature_select_strategy="default",
                             vision_feature_layer=-1, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # loud image features and sharp attention, so each image gets a caption of its own
        for param in model.model.multi_modal_projector.parameters():
            param.normal_(0.0, 1.0)
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(30.0)
    # Never end early, and only tokens that decode to printable text of their own: every caption has words in it.
    pieces = [tok.decode([i]) for i in range(len(tok))]
    bad = [i for i, p in enumerate(pieces)
           if i in tok.all_special_ids or not p.strip() or not p.isprintable() or "\ufffd" in p]  # fmt: skip
    model.generation_config.update(min_new_tokens=4, suppress_tokens=bad)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Captioner:
    folder = save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava-next")
    return Captioner(str(folder), device="cpu", prompt="Describe the image.", max_new_tokens=6)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Captioner:
    folder = save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")
    return Captioner(str(folder), device="cpu", max_new_tokens=6)


def png(seed: int, w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(5):
        (root / f"new{i}.png").write_bytes(png(i))  # no caption
    (root / "blank.png").write_bytes(png(10))
    (root / "blank.txt").write_text("  \n")  # empty counts as missing
    (root / "mine.png").write_bytes(png(11))
    (root / "mine.txt").write_text("my own caption")
    (root / "broken.png").write_bytes(b"not a png")  # no caption, cannot be decoded
    return root


def test_compose():
    assert compose("  a  dog ", "sks", "{trigger}, ", "") == "sks, a dog"
    assert compose("a dog", "sks", "photo of {trigger}: ", ", {trigger} style") == "photo of sks: a dog, sks style"
    assert compose("a dog", None, "", "") == "a dog"


def test_sidecars_missing_only_with_trigger(captioner, tmp_path):
    root = make_folder(tmp_path / "imgs")
    report = caption_source(root, captioner, trigger="sks", batch_size=3, progress=False)
    assert (report.seen, report.captioned, report.kept, report.failed) == (8, 6, 1, 1)
    assert report.captioned + report.kept + report.resumed + report.failed == report.seen
    assert (
        report.failed_items[0]["key"] == "broken" and report.failed_items[0]["reason"] == "not a recognised image file"
    )
    assert (root / "mine.txt").read_text() == "my own caption"  # never overwritten unless asked
    for name in ["new0", "new1", "new2", "new3", "new4", "blank"]:
        text = (root / f"{name}.txt").read_text().strip()
        assert text.startswith("sks, ") and len(text.split()) >= 4 and set(text[5:].split()) <= set(WORDS), text
    assert not (root / "broken.txt").exists()
    # Batching does not change a caption: the same image alone gives the same text.
    alone = captioner([Image.open(root / "new3.png").convert("RGB")])[0]
    assert (root / "new3.txt").read_text().strip() == f"sks, {alone}"
    # A second run finds everything captioned; prepare reads the result.
    again = caption_source(root, captioner, trigger="sks", progress=False)
    assert (again.captioned, again.kept, again.failed) == (0, 7, 1)
    assert prepare(root, tmp_path / "raw", progress=False).written == 7


def test_overwrite_only_when_asked(captioner, tmp_path):
    root = make_folder(tmp_path / "imgs")
    report = caption_source(root, captioner, suffix=", {trigger} style", trigger="ohwx", overwrite=True,
                            progress=False)  # fmt: skip
    assert (report.captioned, report.kept, report.failed) == (7, 0, 1)
    assert (root / "mine.txt").read_text().strip().endswith(", ohwx style")
    assert not (root / ".flowtrain-caption.log").exists()  # the resume log goes once the run finished


class _DiesAfter:
    """The captioner, killed (KeyboardInterrupt) on its n-th batch: what a Ctrl-C or preemption does mid-run."""

    def __init__(self, inner: Captioner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner(images)


def test_jsonl_resumes_after_a_kill(captioner, tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "captions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption_source(root, _DiesAfter(captioner, 2), jsonl=out, batch_size=2, progress=False)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in first] == ["blank", "mine"]  # batch 1 (blank, broken) done; mine kept; batch 2 died
    with out.open("a") as f:
        f.write('{"key": "new0", "ima')  # a line cut by the kill
    report = caption_source(root, captioner, jsonl=out, batch_size=2, progress=False)
    assert report.resumed == 2 and report.captioned == 5 and report.failed == 1 and report.seen == 8
    records = {}
    for line in out.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        assert r["key"] not in records
        records[r["key"]] = r
    assert set(records) == {"blank", "mine", "new0", "new1", "new2", "new3", "new4"}
    assert records["mine"] == {"key": "mine", "image": str(root / "mine.png"), "caption": "my own caption",
                               "generated": False}  # fmt: skip
    assert not (root / "new0.txt").exists()  # JSONL mode writes no sidecars


def test_sidecars_need_a_folder(captioner, tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "list.tsv").write_text("a.png\tx\n")
    with pytest.raises(ValueError, match="sidecar .txt captions need a folder of images; write a JSONL with --jsonl"):
        caption_source(tmp_path / "list.tsv", captioner, progress=False)
    with pytest.raises(ValueError, match=r"only \{trigger\} may stand in braces"):
        caption_source(tmp_path, captioner, prefix="{name}: ", progress=False)


def test_cli(captioner, tmp_path, capsys):
    from flowtrain.cli import main

    root = make_folder(tmp_path / "imgs")
    model = captioner.model.name_or_path
    argv = ["caption", str(root), "--model", model, "--trigger", "sks", "--batch-size", "4", "--device", "cpu"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "caption: 6 new, 1 kept (had a caption), 0 done earlier, 1 failed, of 8" in out
    assert "failed: broken: not a recognised image file" in out
    assert (root / "new0.txt").read_text().startswith("sks, ") and (root / "mine.txt").read_text() == "my own caption"
    with pytest.raises(SystemExit):  # argparse: not both
        main([*argv, "--missing-only", "--overwrite-captions"])
    assert "not allowed with argument --missing-only" in capsys.readouterr().err


def test_sidecars_on_an_fsspec_folder(captioner):
    """A folder at a URL (fsspec's in-memory store): sidecars are written there; a non-UTF-8 caption is kept."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/cap-test/a.png", png(1))
    fs.pipe_file("/cap-test/b.png", png(2))
    fs.pipe_file("/cap-test/b.txt", "café".encode("latin-1"))
    try:
        report = caption_source("memory://cap-test", captioner, trigger="sks", progress=False)
        assert (report.captioned, report.kept, report.failed) == (1, 1, 0)
        assert fs.cat_file("/cap-test/a.txt").decode().startswith("sks, ")
        assert fs.cat_file("/cap-test/b.txt") == "café".encode("latin-1")
    finally:
        fs.rm("/cap-test", recursive=True)


def test_jsonl_for_a_webdataset_source(captioner, tmp_path):
    """Sources without files to put sidecars beside (tar shards here) are captioned into a JSONL, by key."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("0.png", png(1)), ("0.txt", b"kept"), ("1.png", png(2)), ("2.png", b"bad")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s-0.tar").write_bytes(buf.getvalue())
    report = caption_source(str(tmp_path / "s-0.tar"), captioner, jsonl=tmp_path / "c.jsonl", progress=False)
    assert (report.captioned, report.kept, report.failed) == (1, 1, 1)
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["key"], r["image"], r["generated"]) for r in records] == [("s-0/0", "s-0.tar:0", False),
                                                                         ("s-0/1", "s-0.tar:1", True)]  # fmt: skip


def make_vlm_folder(root: Path) -> Path:
    """Three uncaptioned images of different aspect ratios (so of different prompt lengths) and a captioned one.
    Plain colours, not noise: noise images look alike to a random vision tower, colours do not."""
    root.mkdir(parents=True)
    for name, colour, size in [("a", "red", (40, 30)), ("b", "blue", (90, 40)), ("c", "yellow", (30, 64)),
                               ("d", "green", (32, 32))]:  # fmt: skip
        Image.new("RGB", size, colour).save(root / f"{name}.png")
    (root / "d.txt").write_text("my own caption")
    return root


def test_chat_vlm_batched_equals_alone(vlm, tmp_path):
    """The chat branch: the processor's template wraps `--prompt` as a user turn with the image, the prompt is cut
    from the output, and with batch size 2 the padded batch (a, b) gives each image the caption it gets alone."""
    assert vlm.chat and vlm.processor.tokenizer.padding_side == "left"
    root = make_vlm_folder(tmp_path / "imgs")
    images = {k: Image.open(root / f"{k}.png").convert("RGB") for k in "abc"}
    inputs = vlm._inputs([images["a"], images["b"]])
    prompt = vlm.processor.tokenizer.decode(inputs["input_ids"][1], skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>user\n<image>") and prompt.endswith(
        "Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    )
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # a's prompt is shorter: padded, on the left
    alone = {k: vlm([im])[0] for k, im in images.items()}
    assert len(set(alone.values())) == 3 and all(len(t.split()) >= 1 for t in alone.values()), alone

    report = caption_source(root, vlm, trigger="sks", batch_size=2, progress=False)
    assert (report.seen, report.captioned, report.kept, report.failed) == (4, 3, 1, 0)
    for k in "abc":
        assert (root / f"{k}.txt").read_text() == f"sks, {alone[k]}\n"
    assert (root / "d.txt").read_text() == "my own caption"


def test_chat_vlm_cli(vlm, tmp_path, capsys):
    from flowtrain.cli import main

    root = make_vlm_folder(tmp_path / "imgs")
    alone = {k: vlm([Image.open(root / f"{k}.png").convert("RGB")])[0] for k in "abc"}
    argv = ["caption", str(root), "--model", vlm.model.name_or_path, "--prompt", "Describe the image.",
            "--prefix", "photo of {trigger}: ", "--trigger", "ohwx", "--batch-size", "2", "--max-new-tokens", "6",
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "caption: 3 new, 1 kept (had a caption), 0 done earlier, 0 failed, of 4" in capsys.readouterr().out
    for k in "abc":
        assert (root / f"{k}.txt").read_text() == f"photo of ohwx: {alone[k]}\n"


class _Counts:
    """The captioner, recording how many images each call got."""

    def __init__(self, inner: Captioner) -> None:
        self.inner, self.sizes = inner, []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.inner(images)


def test_sidecar_overwrite_resumes_after_a_kill(captioner, tmp_path):
    """--overwrite-captions with sidecars: the hidden progress log lets a rerun skip what the killed run already
    overwrote (those keep the killed run's captions: trigger ohwx), caption the rest (trigger sks), then go."""
    root = make_folder(tmp_path / "imgs")
    log = root / ".flowtrain-caption.log"
    with pytest.raises(KeyboardInterrupt):  # batches (blank, broken), (mine, new0) done; (new1, new2) killed
        caption_source(root, _DiesAfter(captioner, 3), trigger="ohwx", overwrite=True, batch_size=2, progress=False)
    assert log.read_text().split() == ["blank", "mine", "new0"]
    done = {k: (root / f"{k}.txt").read_text() for k in ["blank", "mine", "new0"]}
    assert all(text.startswith("ohwx, ") for text in done.values()), done
    assert not (root / "new1.txt").exists()

    counts = _Counts(captioner)
    report = caption_source(root, counts, trigger="sks", overwrite=True, batch_size=2, progress=False)
    assert (report.seen, report.resumed, report.captioned, report.kept, report.failed) == (8, 3, 4, 0, 1)
    assert sum(counts.sizes) == 4  # new1..new4 only: broken fails to decode, the resumed three are not redone
    assert {k: (root / f"{k}.txt").read_text() for k in done} == done
    for k in ["new1", "new2", "new3", "new4"]:
        assert (root / f"{k}.txt").read_text().startswith("sks, ")
    assert not log.exists()  # finished: the log goes, and the next overwrite run starts from scratch
    again = caption_source(root, captioner, trigger="sks", overwrite=True, batch_size=2, progress=False)
    assert (again.resumed, again.captioned) == (0, 7) and (root / "mine.txt").read_text().startswith("sks, ")


def test_sidecar_overwrite_log_with_a_cut_line(captioner, tmp_path):
    """A kill can cut the progress log's last key: the fragment is not a key done, and the next key written starts
    on a line of its own (glued to the fragment it would be lost, and a third run would redo it)."""
    root = make_folder(tmp_path / "imgs")
    log = root / ".flowtrain-caption.log"
    log.write_text("blank\nmine\nnew")  # "new" is cut from "new0": new0's sidecar may not be written yet
    with pytest.raises(KeyboardInterrupt):  # (broken, new0), (new1, new2) done; (new3, new4) killed
        caption_source(root, _DiesAfter(captioner, 3), overwrite=True, batch_size=2, progress=False)
    assert log.read_text().split("\n") == ["blank", "mine", "new", "new0", "new1", "new2", ""]
    counts = _Counts(captioner)
    report = caption_source(root, counts, overwrite=True, batch_size=2, progress=False)
    assert (report.resumed, report.captioned, report.failed) == (5, 2, 1) and sum(counts.sizes) == 2
    assert not log.exists()
