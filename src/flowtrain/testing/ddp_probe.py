"""Run under `accelerate launch`: train from a config, then each rank writes its trainable weights to
`{output_dir}/rank{r}-weights.safetensors`, so a test can check that every rank holds identical weights.

    accelerate launch --multi_gpu --num_processes 2 -m flowtrain.testing.ddp_probe CONFIG [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    from flowtrain.config import load_config
    from flowtrain.train.loop import train
    from flowtrain.train.trainable import trainable_state

    cfg = load_config(argv[0], argv[1:])
    result = train(cfg, progress=False)
    rank = PartialState().process_index
    weights = {k: v.contiguous() for k, v in trainable_state(result.transformer).items()}
    save_file(weights, str(Path(cfg.output_dir) / f"rank{rank}-weights.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
