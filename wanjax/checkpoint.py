"""Orbax checkpoints of a training run: state pytree + data-iterator state + JSON metadata, atomically.

Layout: `output_dir/checkpoints/<step>/{state, data, meta}`. Orbax writes each step under a temporary name
and renames it when complete, so a checkpoint is complete or absent; `checkpoints_total_limit` keeps the
newest N. The data item is grain's own handler: each process saves its iterator, so a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

META_FILE = "metadata"  # orbax JsonSave's file in <step>/meta/

logger = logging.getLogger(__name__)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir).absolute() / "checkpoints"


class Checkpointer:
    """Saves and restores (state, data iterator, metadata) by step."""

    def __init__(self, output_dir: str | os.PathLike | None = None, *, max_to_keep: int | None,
                 directory: str | os.PathLike | None = None):
        """`output_dir`'s checkpoints/, or a folder of <step> checkpoints given as `directory` (to resume from a
        copy kept anywhere)."""
        self.directory = Path(directory).absolute() if directory is not None else checkpoint_dir(output_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, meta: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, iterator: Any) -> tuple[Any, dict, str | None]:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying shardings) and set `iterator`'s position.
        Returns (state, meta, None), or, when the data changed since the save (files cached since, other batch
        settings: the saved position means nothing in the new batch plan), (state, meta, why) with `iterator` left
        at its start: the run continues from the saved weights and optimizer on a fresh data order."""
        from wanjax.data.pipeline import DataChanged

        state, meta = ocp.args.StandardRestore(abstract_state), ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=state, data=grain.checkpoint.CheckpointRestore(iterator), meta=meta))
            return out.state, out.meta, None
        except DataChanged as e:
            out = self.manager.restore(step, args=ocp.args.Composite(state=state, meta=meta))
            return out.state, out.meta, str(e)

    def close(self) -> None:
        self.manager.close()


def read_meta(step_dir: str | os.PathLike) -> dict:
    """The JSON metadata of checkpoint `step_dir` (`.../checkpoints/<step>`), read by name: its meta/ folder also
    holds orbax's commit_success.txt, and listing order depends on the filesystem."""
    meta_path = Path(step_dir) / "meta"
    meta_file = meta_path if meta_path.is_file() else meta_path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not found; expected the checkpoint's JSON metadata (meta/{META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_file}: not JSON ({e}); expected the checkpoint's JSON metadata") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def resolve_resume(spec: str | None, output_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """`resume_from_checkpoint`: None / "" (start fresh), "latest" (newest in output_dir, or fresh if none),
    or a checkpoint path `.../checkpoints/<step>`. Returns (checkpoints dir, step)."""
    if not spec:
        return None
    if spec == "latest":
        directory = checkpoint_dir(output_dir)
        if not directory.exists():
            return None
        steps = ocp.utils.checkpoint_steps(directory) if hasattr(ocp.utils, "checkpoint_steps") else None
        if steps is None:
            steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
        return (directory, max(steps)) if steps else None
    path = Path(spec).absolute()
    if not path.is_dir() or not path.name.isdigit() or not (path / "state").exists():
        raise ValueError(f"resume_from_checkpoint={spec!r}: expected 'latest' or a checkpoint folder .../checkpoints/<step>")
    return path.parent, int(path.name)


def is_primary() -> bool:
    return jax.process_index() == 0
