"""One metrics writer: `output_dir/metrics.jsonl` always, wandb when asked, a progress bar; process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax

logger = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class MetricsWriter:
    """Writes one JSON object per logged step; mirrors to wandb (offline without credentials)."""

    def __init__(self, output_dir: str | os.PathLike, *, report_to: str, project: str, run_name: str,
                 config: dict[str, Any], total_steps: int, initial_step: int = 0, resume: bool = False,
                 loss_key: str = "loss"):
        self.enabled = jax.process_index() == 0
        self.loss_key = loss_key
        self.wandb = None
        self.bar = None
        if not self.enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._truncate_after(initial_step)
        self.file = open(self.path, "a")
        if report_to == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_credentials() else "offline")
            if mode == "offline":
                logger.info("wandb: no credentials found, logging offline to %s/wandb", output_dir)
            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=str(output_dir), mode=mode,
                                    resume="allow")
        elif report_to not in ("none", "", None):
            raise ValueError(f"report_to={report_to!r}: expected 'wandb' or 'none'")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one uninterrupted run."""
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
        if self.bar is not None:
            loss = row.get(self.loss_key)
            self.bar.set_postfix({self.loss_key: f"{loss:.4g}" if isinstance(loss, float) else loss,
                                  "lr": f"{row.get('lr', 0):.3g}"})

    def log_videos(self, step: int, videos: dict[str, str | os.PathLike], captions: dict[str, str] | None = None
                   ) -> None:
        """Validation videos as wandb.Video entries `validation/<name>` (the files list is validation/videos.jsonl)."""
        if not self.enabled or not videos:
            return
        if self.wandb is not None:
            import wandb

            captions = captions or {}
            self.wandb.log({f"validation/{k}": wandb.Video(str(v), caption=captions.get(k), format="mp4")
                            for k, v in videos.items()}, step=int(step))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
