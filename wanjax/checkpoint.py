"""Orbax checkpoints of a training run: state pytree + data-iterator state + JSON metadata, atomically.

Layout: `output_dir/checkpoints/<step>/{state, data, meta}`. Orbax writes each step under a temporary name
and renames it when complete, so a checkpoint is complete or absent; `checkpoints_total_limit` keeps the
newest N. The data item is grain's own handler: each process saves its iterator as
`data/process_<i>-of-<n>.json`, so a resumed run sees exactly the batches it would have seen, also on another
number of processes (the saved position is a global batch index, the same in every process: see
wanjax.data.pipeline).
"""

from __future__ import annotations

import json
import logging
import os
import re
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
        at its start: the run continues from the saved weights and optimizer on a fresh data order.

        The position is read from this process's data file, or from another process's when the checkpoint was
        saved by another number of processes (grain's own restore reads only the former)."""
        from wanjax.data.pipeline import DataChanged

        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        index, count = iterator.fingerprint["process_index"], iterator.fingerprint["process_count"]
        path = data_state_file(self.directory / str(step) / "data", index, count)
        saved = json.loads(path.read_text())
        try:
            iterator.set_state(saved)
        except DataChanged as e:
            return out.state, out.meta, str(e)
        iterator.start_prefetch()
        if path.name != _data_file_name(index, count):
            pipe = saved["pipeline"]
            logger.info("data position carried over from process %s of %s of the saved run (this run: process %d of "
                        "%d): every process continues at the global batch the saved run would have read next",
                        pipe.get("process_index"), pipe.get("process_count"), index, count)
        return out.state, out.meta, None

    def close(self) -> None:
        self.manager.close()


def _data_file_name(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"  # grain's CheckpointHandler's name


def data_state_file(data_dir: str | os.PathLike, process_index: int, process_count: int) -> Path:
    """The saved iterator state that process `process_index` of `process_count` resumes from: its own
    `process_<i>-of-<n>.json` in the checkpoint's `data_dir`, else (a checkpoint of another process count) the
    file of the saved run's lowest process: every process's state holds the same global batch position."""
    data_dir = Path(data_dir)
    own = data_dir / _data_file_name(process_index, process_count)
    if own.is_file():
        return own
    found = sorted((int(m[1]), p) for p in data_dir.glob("process_*-of-*.json")
                   if (m := re.fullmatch(r"process_(\d+)-of-\d+\.json", p.name)))
    if not found:
        raise ValueError(f"{data_dir}: no data-iterator state ({own.name} or another process's) in the checkpoint")
    return found[0][1]


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
