"""Which cached records are current: per-item fingerprints (media size / mtime, caption hash) taken when an item is
encoded, the latest record of each key, and the items changed since their latest record was encoded. Used by the
caching job (wanjax/cache.py); the fingerprints are stored in the done-lists (records.ShardInfo.fingerprints)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from wanjax.data import sources
from wanjax.data.records import ShardInfo


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def item_fingerprint(item: sources.Item) -> dict[str, Any] | None:
    """What an item looks like now, cheaply: size and mtime_ns of its media file (local datasets) and a hash of its
    caption (when known before loading: not for TFDS). None when there is nothing to tell."""
    fp: dict[str, Any] = {}
    if item.path:
        try:
            st = os.stat(item.path)
            fp.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        except OSError:
            pass
    if item.caption is not None:
        fp["caption"] = caption_hash(item.caption)
    return fp or None


def _difference(old: Any, now: dict[str, Any] | None) -> str | None:
    """How an item changed since its record was encoded, or None. Only what both fingerprints hold is compared: a
    record without one (done-lists written before fingerprints were recorded) counts as unchanged."""
    if not isinstance(old, dict) or not now:
        return None
    what = []
    if "caption" in old and "caption" in now and old["caption"] != now["caption"]:
        what.append("caption edited")
    if any(k in old and k in now and old[k] != now[k] for k in ("size", "mtime_ns")):
        what.append("media file replaced or modified")
    return " and ".join(what) or None


def latest_records(shards: list[ShardInfo]) -> dict[str, tuple[int, int]]:
    """key -> (shard index, position) of its current record: the one of the latest run (ties: the later shard in
    name order). A key has several records when its item was re-encoded after its file or caption changed."""
    best: dict[str, tuple[tuple[int, int], int, int]] = {}
    for si, s in enumerate(shards):
        for pos, k in enumerate(s.keys):
            if k not in best or (s.run, si) >= best[k][0]:
                best[k] = ((s.run, si), si, pos)
    return {k: (si, pos) for k, (_, si, pos) in best.items()}


def changed_items(items: list[sources.Item], shards: list[ShardInfo],
                   latest: dict[str, tuple[int, int]]) -> dict[str, str]:
    """key -> how it changed, for the items whose latest record was encoded from another file or caption."""
    out = {}
    for it in items:
        if it.key in latest:
            si, pos = latest[it.key]
            why = _difference(shards[si].fingerprint(pos), item_fingerprint(it))
            if why:
                out[it.key] = why
    return out
