"""Optional backends: TensorBoard and Weights & Biases. Neither package is a core dependency
(`pip install 'flowtrain[tracking]'` installs both); asking for one that is not installed is an error that names
the package, raised before training starts."""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def missing_backend(backend: str, package: str) -> ImportError:
    return ImportError(
        f"tracking.report_to includes {backend!r} but the {package!r} package is not installed: "
        f"pip install {package}  (or pip install 'flowtrain[tracking]'), or remove {backend!r} from tracking.report_to"
    )


class TensorBoardTracker:
    """Event files in `{output_dir}/logs/tensorboard/` (`tensorboard --logdir {output_dir}/logs/tensorboard`).

    On resume, events after the resumed step are purged (TensorBoard's `purge_step`), so steps appear once.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_backend("tensorboard", "tensorboard") from None
        self.log_dir = Path(output_dir) / "logs" / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log_params(self, params: Mapping[str, Any]) -> None:
        table = "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())
        self.writer.add_text("config", table, 0)

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        for k, v in metrics.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            with Image.open(path) as im:
                self.writer.add_image(
                    str(Path(name).with_suffix("")), np.asarray(im.convert("RGB")), step, dataformats="HWC"
                )
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass  # TensorBoard has no artifact store; the files stay in the run dir

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def wandb_mode() -> str:
    """`offline` unless W&B credentials are there (WANDB_API_KEY or a netrc entry); WANDB_MODE always wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        hosts = {}
    return "online" if any("wandb" in h for h in hosts) else "offline"


class WandbTracker:
    """One W&B run per training run (project = `tracking.experiment_name`); files under `{output_dir}/logs/wandb/`.

    The run id is kept in `{output_dir}/logs/wandb_run.json` so a resumed training continues the same W&B run.
    Offline runs can be uploaded later with `wandb sync {output_dir}/logs/wandb/offline-run-*`.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        experiment_name: str = "flowtrain",
        run_name: str | None = None,
        resume_step: int | None = None,
    ):
        try:
            import wandb
        except ImportError:
            raise missing_backend("wandb", "wandb") from None
        out = Path(output_dir).resolve()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        id_file = out / "logs" / "wandb_run.json"
        run_id = None
        if resume_step is not None and id_file.exists():
            run_id = json.loads(id_file.read_text()).get("run_id")
        self._wandb = wandb
        self.run = wandb.init(
            project=experiment_name,
            name=run_name or out.name,
            dir=str(out / "logs"),
            id=run_id,
            resume="allow" if run_id else None,
            mode=wandb_mode(),
        )
        id_file.write_text(json.dumps({"run_id": self.run.id}))
        # W&B refuses steps that go backwards within a run; after resuming from an older checkpoint the repeated
        # steps are skipped (as for MLflow), since W&B cannot rewrite them.
        self._skip_until = int(getattr(self.run, "step", 0) or 0) if run_id else 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        if step < self._skip_until:
            return
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        if step < self._skip_until:
            return
        self.run.log({str(Path(n).with_suffix("")): self._wandb.Image(str(p)) for n, p in images.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        art = self._wandb.Artifact(name=f"{self.run.id}-{path.stem}".replace(".", "-"), type="flowtrain")
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
