"""The README claims only what a test shows (issue 11, case 10): it said training runs on DDP, FSDP and DeepSpeed,
while nothing tested FSDP or DeepSpeed. Each scale-out backend the README names must be named as untested
somewhere, or be cited next to a test file that launches it and that pytest collects."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# How a test launches each backend (a flag of `accelerate launch`, or a shipped launch config), and the directories
# pytest does not collect: none since tests/dist is collected (tests/test_collection.py fails if any test file is not).
LAUNCHES = {
    "DDP": r"--multi_gpu|ddp\.yaml",
    "FSDP": r"--use_fsdp|fsdp2\.yaml",
    "DeepSpeed": r"--use_deepspeed|zero[23]\.yaml|\"zero[23]\"",
}
UNCOLLECTED: tuple[str, ...] = ()


def _collected_tests_that_launch(pattern: str) -> list[Path]:
    return [
        p
        for p in (REPO / "tests").rglob("test_*.py")
        if not set(p.relative_to(REPO / "tests").parts[:-1]) & set(UNCOLLECTED) and re.search(pattern, p.read_text())
    ]


def test_readme_names_scale_out_only_with_a_test_or_as_untested():
    readme = (REPO / "README.md").read_text()
    paragraphs = re.split(r"\n\s*\n", readme)
    for backend, flag in LAUNCHES.items():
        if not re.search(rf"\b{backend}\b", readme):
            continue
        tests = [str(t.relative_to(REPO)) for t in _collected_tests_that_launch(flag)]
        backed = [p for p in paragraphs if re.search(rf"\b{backend}\b", p) and any(t in p for t in tests)]
        untested = re.search(rf"[Nn]ot tested[^.]*\b{backend}\b", readme)
        assert backed or untested, f"README names {backend} without citing a collected test that launches it"
