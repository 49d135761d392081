"""Where the caching job's items come from: SimpleTuner's multidatabackend.json (or `tfds:NAME[:split]`).

`read_datasets(spec)` parses the dataset list into `DatasetSpec`s plus notes: every key is either honoured or
reported by name with the reason it has no effect here (unknown keys too), never silently dropped.
`discover(datasets)` lists the items in a deterministic order (datasets in file order, files sorted by path),
with discovery-time skips (missing caption, image where a video is expected). `load(item, dataset)` gives
(clip, caption) or raises `video.Skip`; `load_many` does that in threads, in order.

Relative paths (`instance_data_dir`, `parquet.path`) are resolved against the current working directory, as
SimpleTuner does, never against the JSON file's folder.

Sources:
- `type: "local"` (SimpleTuner): files under `instance_data_dir`, recursive, hidden files skipped. Captions by
  `caption_strategy`: `textfile` (same-stem .txt beside the file; the first non-empty line, SimpleTuner's
  multi-caption lines are not sampled; `disable_multiline_split` keeps the whole text), `filename` (stem, "_" ->
  " "), `instanceprompt` (`instance_prompt`), `parquet` (SimpleTuner's `parquet` block: a .parquet, .jsonl or .json
  table with `filename_column`, `caption_column`, `fallback_caption_column`; identifiers are paths relative to
  instance_data_dir (absolute paths under it are made relative; "./" is dropped), so `identifier_includes_extension`
  either way works: a file takes the row of its exact relative path, else the row of that path without its media
  extension (an identifier ending in another media extension never matches: `dup` may caption dup.mp4 and dup.mkv,
  `dup.mp4` captions dup.mp4 only; dots inside a name are kept, `my.clip.v2` captions my.clip.v2.mp4), else, for
  identifiers without a folder, the same two by file name. One identifier captioning several files is reported in a
  note naming them), and `jsonl` (a wanjax shorthand: the `parquet` block if given, else
  `instance_data_dir/metadata.jsonl` with `file_name` and `caption` (or `text`) columns).
  Text files (captions, tables, prompts) are read as UTF-8; a leading byte-order mark is ignored.
  Folders are walked following symlinks; a folder reached a second time (a symlink loop such as `ln -s . loop`, or a
  second link to one folder) is not listed again, and a note names it.
- `max_num_samples` (SimpleTuner's): the items whose keys hash (crc32 of "<id>/<relative path>", ties by key) lowest,
  so a smaller value keeps a subset of a larger one's pick and a new file changes the pick by at most one item
  (caches made before this rule picked a random subset: the items it no longer picks become inactive, see
  wanjax/cache.py).
- `type: "tfds"` (wanjax): a prepared TFDS dataset, `tfds_name`, `split` ("train"), `data_dir`, `video_key`
  ("video": uint8 (F, H, W, 3) frames, or the bytes of a video file), `caption_key` ("caption"). Read with
  `tfds.data_source`, which needs no tensorflow for array_record datasets with Tensor / Text features
  (`tfds.features.Video` itself imports tensorflow). `pip install tensorflow-datasets` if missing.
- `dataset_type: "prompts"` (wanjax; for DMD, which needs prompts, not videos): `prompts_file` (a .txt with one
  prompt per non-empty line, a .json list of prompts or {nickname: prompt} prompt library, or a .jsonl of objects
  with `caption` / `prompt` / `text`) and the clip size the student generates at: `width`, `height`, `num_frames`
  (4k+1; defaults 832 x 480 x 81). Cached as records with prompt embeddings and a latent shape, without latents.
"""

from __future__ import annotations

import collections
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from wanjax.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipSpec, Skip, load_clip, prepare_frames

_CLIP_KEYS = ("resolution", "resolution_type", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style",
              "minimum_image_size", "minimum_aspect_ratio", "maximum_aspect_ratio")
_VIDEO_KEYS = ("num_frames", "min_frames", "max_frames", "frame_interval", "frame_stride")
_LATENTS_HERE = "latents are written to config.cache_dir (one wanjax cache for all datasets)"
_NOT_APPLICABLE = {
    "cache_dir_vae": _LATENTS_HERE,
    "cache_dir": _LATENTS_HERE,
    "image_embeds": _LATENTS_HERE,
    "text_embeds": "prompt embeddings are stored with each record in config.cache_dir",
    "maximum_image_size": "frames are resized straight to the bucket (resize to cover, then crop); no separate "
                          "downsample-before-crop step",
    "target_downsample_size": "frames are resized straight to the bucket (resize to cover, then crop); no separate "
                              "downsample-before-crop step",
    "bucket_strategy": "buckets are exact latent shapes (C, F, H, W), i.e. always like 'resolution_frames'",
    "probability": "datasets are mixed by their item counts x (repeats + 1); per-dataset sampling probability is "
                   "not supported",
    "is_i2v": "the cache holds text-to-video latents; image conditioning is not cached",
    "conditioning_image_embeds": "image conditioning is not cached",
    "cache_dir_conditioning_image_embeds": "image conditioning is not cached",
    "conditioning_data": "conditioning datasets are not supported",
    "vae_cache_clear_each_epoch": "latents are cached once (center crops, nothing random to re-draw)",
    "vae_cache_ondemand": "latents are cached once, before training",
    "vae_cache_disable": "latents are cached once, before training",
    "skip_file_discovery": "the caching job always lists the files; reruns skip what is cached",
    "preserve_data_backend_cache": "the caching job always lists the files; reruns skip what is cached",
    "hash_filenames": "records are keyed by dataset id + relative path",
    "metadata_update_interval": "no metadata refresh during training",
    "delete_unwanted_images": "caching skips and reports bad files (cache_report.json); it never deletes data",
    "delete_problematic_images": "caching skips and reports bad files (cache_report.json); it never deletes data",
    "caption_shuffle": "one caption per record; caption shuffling is not supported",
    "start_epoch": "dataset scheduling is not supported", "start_step": "dataset scheduling is not supported",
    "end_epoch": "dataset scheduling is not supported", "end_step": "dataset scheduling is not supported",
    "is_regularisation_data": "regularisation datasets are not supported",
    "is_regularization_data": "regularisation datasets are not supported",
    "timestep_sampling_offset": "per-dataset timestep offsets are not supported",
    "slider_strength": "slider LoRA training is not supported",
}
_TEXT_EMBEDS_NOTE = "text embeddings are stored with each record in config.cache_dir; this entry is not needed"


class DatasetConfigError(ValueError):
    """The dataset list cannot be used as written."""


@dataclass(frozen=True)
class DatasetSpec:
    id: str
    type: str  # "local" | "tfds"
    clip: ClipSpec
    repeats: int = 0
    instance_data_dir: str | None = None
    caption_strategy: str = "textfile"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    disable_multiline_split: bool = False
    parquet: dict = field(default_factory=dict)
    max_num_samples: int | None = None
    tfds: dict = field(default_factory=dict)  # name, split, data_dir, video_key, caption_key
    prompts_file: str | None = None  # type "prompts": the prompt list
    prompt_size: tuple[int, int, int] | None = None  # type "prompts": (num_frames, height, width) in pixels

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the latents and captions of an item (not repeats or the item subset)."""
        d = asdict(self)
        d.pop("repeats"), d.pop("max_num_samples")
        return d


@dataclass(frozen=True)
class Item:
    key: str  # "<dataset id>/<path relative to instance_data_dir>" or "<id>/<split>/<index>": unique, stable
    dataset: str
    path: str | None = None
    caption: str | None = None  # None: known only when loaded (TFDS)
    index: int = -1


@dataclass
class Discovery:
    items: list[Item]
    skipped: dict[str, dict[str, str]]  # key -> {"dataset", "path", "reason", "detail"}
    notes: list[dict[str, str]]


def _truthy(v: Any) -> bool:
    """JSON booleans, and the strings SimpleTuner configs carry ("true", "false", "1", ...)."""
    return v.strip().lower() in ("true", "1", "yes") if isinstance(v, str) else bool(v)


def _note(notes: list, dataset: str, key: str, note: str) -> None:
    notes.append({"dataset": dataset, "key": key, "note": note})


def read_datasets(spec: str | os.PathLike, defaults: Mapping[str, Any] | None = None
                  ) -> tuple[list[DatasetSpec], list[dict[str, str]]]:
    """`spec`: a multidatabackend.json path (a list of entries, or one entry) or "tfds:NAME[:split]".
    `defaults`: trainer-level values a dataset falls back to, as in SimpleTuner (resolution, resolution_type,
    minimum_image_size, ...). Returns the enabled video/image datasets and notes ({dataset, key, note}) on
    everything not honoured."""
    spec = os.fspath(spec)
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    if spec.startswith("tfds:"):
        name, _, split = spec[5:].partition(":")
        entries: Any = [{"id": name, "type": "tfds", "tfds_name": name, "split": split or "train"}]
    else:
        try:
            entries = json.loads(Path(spec).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise DatasetConfigError(f"data_backend_config={spec!r}: no such file (relative to {os.getcwd()})") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetConfigError(f"data_backend_config={spec!r}: not readable JSON ({e})") from None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DatasetConfigError(f"{spec}: expected a list of dataset objects")
    datasets, notes = [], []
    for i, entry in enumerate(entries):
        if entry.get("dataset_type", "image") in ("video", "image") or entry.get("type") == "tfds":
            entry = {**defaults, **entry}
        ds = _parse_entry(entry, i, notes)
        if ds is not None:
            datasets.append(ds)
    ids = [d.id for d in datasets]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise DatasetConfigError(f"{spec}: dataset ids {dup} are used more than once")
    if not datasets:
        raise DatasetConfigError(f"{spec}: no enabled video, image or prompts dataset")
    return datasets, notes


def _number(did: str, key: str, v: Any, typ: type = float):
    """`v` as `typ` (None stays None), else a DatasetConfigError naming the dataset, the key and the value."""
    try:
        return None if v is None else typ(v)
    except (TypeError, ValueError):
        kind = "an integer" if typ is int else "a number"
        raise DatasetConfigError(f"{did}: {key}={v!r} is not {kind}") from None


def _parse_entry(entry: Mapping[str, Any], i: int, notes: list) -> DatasetSpec | None:
    e = dict(entry)
    did = str(e.pop("id", "") or "")
    name = did or f"entry {i}"
    dtype = e.pop("dataset_type", "image" if e.get("type") != "tfds" else "video")
    disabled = _truthy(e.pop("disabled", False)) | _truthy(e.pop("disable", False))
    if dtype == "text_embeds":
        for k in e:
            _note(notes, name, k, _TEXT_EMBEDS_NOTE)
        return None
    if dtype not in ("video", "image", "prompts"):
        _note(notes, name, "dataset_type", f"{dtype!r} datasets are not used by wanjax caching; entry skipped")
        return None
    if disabled:
        _note(notes, name, "disabled", "disabled: entry skipped")
        return None
    if not did:
        raise DatasetConfigError(f"{name}: a {dtype} dataset needs an 'id'")
    if dtype == "prompts":
        return _parse_prompts_entry(did, e, notes)
    kind = e.pop("type", "local")
    video = dict(e.pop("video", None) or {})
    for k in _VIDEO_KEYS:  # dmd-dataset.json style: video options at the top level
        if k in e:
            video.setdefault(k, e.pop(k))

    clip_kw: dict[str, Any] = {}
    for k in _CLIP_KEYS:
        if k in e:
            v = e.pop(k)
            if k == "crop":
                v = _truthy(v)
            elif k == "crop_aspect_buckets":
                try:
                    v = tuple(float(x) for x in v)
                except (TypeError, ValueError):
                    raise DatasetConfigError(f"{did}: crop_aspect_buckets={v!r}: expected a list of numbers") from None
            elif k in ("resolution", "minimum_image_size", "minimum_aspect_ratio", "maximum_aspect_ratio"):
                v = _number(did, k, v)
            if v is not None:
                clip_kw[k] = v
    if clip_kw.get("crop_style", "center") not in ("center", "corner"):
        _note(notes, did, "crop_style", f"{clip_kw['crop_style']!r}: crops are centred (deterministic cache)")
        clip_kw["crop_style"] = "center"
    if clip_kw.get("crop") and clip_kw.get("crop_aspect") == "random":
        _note(notes, did, "crop_aspect", "'random': the closest of crop_aspect_buckets is used (deterministic cache)")
    for k, v in video.items():
        if k in _VIDEO_KEYS:
            if v is not None:
                clip_kw[k] = _number(did, f"video.{k}", v, int)
        else:
            _note(notes, did, f"video.{k}", _NOT_APPLICABLE.get(k, "unknown key: not a video option wanjax knows"))
    if dtype == "image":
        clip_kw["image"] = True
    try:
        clip = ClipSpec(**clip_kw)
    except (TypeError, ValueError) as err:
        raise DatasetConfigError(f"{did}: {err}") from None
    repeats = _number(did, "repeats", e.pop("repeats", 0) or 0, int)
    if repeats < 0:
        raise DatasetConfigError(f"{did}: repeats={repeats} must be >= 0")
    out: dict[str, Any] = dict(id=did, type=kind, clip=clip, repeats=repeats,
                               max_num_samples=_number(did, "max_num_samples", e.pop("max_num_samples", None), int))
    metadata_backend = e.pop("metadata_backend", "discovery")
    if metadata_backend not in ("discovery", "parquet"):
        _note(notes, did, "metadata_backend", f"{metadata_backend!r}: files are always discovered and decoded")
    if kind == "local":
        if not e.get("instance_data_dir"):
            raise DatasetConfigError(f"{did}: a local {dtype} dataset needs instance_data_dir")
        out["instance_data_dir"] = str(e.pop("instance_data_dir"))
        strategy = e.pop("caption_strategy", "textfile")
        if strategy not in ("textfile", "filename", "instanceprompt", "parquet", "jsonl"):
            raise DatasetConfigError(f"{did}: caption_strategy={strategy!r}: expected textfile | filename | "
                                     "instanceprompt | parquet | jsonl")
        out["caption_strategy"] = strategy
        out["instance_prompt"] = e.pop("instance_prompt", None)
        for k in ("prepend_instance_prompt", "only_instance_prompt", "disable_multiline_split"):
            out[k] = _truthy(e.pop(k, False))
        if (strategy == "instanceprompt" or out["prepend_instance_prompt"] or out["only_instance_prompt"]) \
                and not out["instance_prompt"]:
            raise DatasetConfigError(f"{did}: caption_strategy/prepend/only_instance_prompt need instance_prompt")
        out["parquet"] = dict(e.pop("parquet", None) or {})
        if strategy == "parquet" and not out["parquet"].get("path"):
            raise DatasetConfigError(f"{did}: caption_strategy 'parquet' needs a 'parquet' block with a 'path'")
    elif kind == "tfds":
        if not e.get("tfds_name"):
            raise DatasetConfigError(f"{did}: a tfds dataset needs tfds_name")
        out["tfds"] = {"name": e.pop("tfds_name"), "split": e.pop("split", "train"), "data_dir": e.pop("data_dir", None),
                       "video_key": e.pop("video_key", "video"), "caption_key": e.pop("caption_key", "caption")}
    else:
        raise DatasetConfigError(f"{did}: type={kind!r}: wanjax caching reads 'local' folders and 'tfds' datasets")
    for k in e:
        _note(notes, did, k, _NOT_APPLICABLE.get(k, "unknown key: not a dataset option wanjax knows"))
    return DatasetSpec(**out)


_PROMPT_SIZE_DEFAULTS = {"num_frames": 81, "height": 480, "width": 832}


def _parse_prompts_entry(did: str, e: dict, notes: list) -> DatasetSpec:
    """A `dataset_type: "prompts"` entry: prompts_file + the generated clip size (see the module docstring)."""
    if not e.get("prompts_file"):
        raise DatasetConfigError(f"{did}: a prompts dataset needs prompts_file (a .txt, .json or .jsonl of prompts)")
    size = []
    for k, default in _PROMPT_SIZE_DEFAULTS.items():
        v = _number(did, k, e.pop(k, default), int)
        if v is None or v < 1:
            raise DatasetConfigError(f"{did}: {k}={v} must be >= 1")
        size.append(v)
    if (size[0] - 1) % 4:
        raise DatasetConfigError(f"{did}: num_frames={size[0]}: Wan clips have 4k+1 frames (e.g. 81, 121)")
    kind = e.pop("type", "local")
    if kind != "local":
        _note(notes, did, "type", f"{kind!r}: a prompts dataset reads its local prompts_file")
    repeats = _number(did, "repeats", e.pop("repeats", 0) or 0, int)
    if repeats < 0:
        raise DatasetConfigError(f"{did}: repeats={repeats} must be >= 0")
    out = DatasetSpec(id=did, type="prompts", clip=ClipSpec(), repeats=repeats,
                      max_num_samples=_number(did, "max_num_samples", e.pop("max_num_samples", None), int),
                      prompts_file=str(e.pop("prompts_file")),
                      prompt_size=(size[0], size[1], size[2]))
    for k in e:
        _note(notes, did, k, "not an option of a prompts dataset (prompts_file, width, height, num_frames, repeats, "
                             "max_num_samples)")
    return out


def read_prompts(path: str | os.PathLike, what: str = "prompts_file") -> list[str]:
    """Prompts from a .txt (one per non-empty line), .json (a list, or {nickname: prompt}) or .jsonl file (objects
    with caption / prompt / text), in file order."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetConfigError(f"{what}={os.fspath(path)!r}: not readable ({err})") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            items = list(data.values()) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ValueError("expected a list of prompts or an object {nickname: prompt}")
        elif p.suffix == ".jsonl":
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                keys = [k for k in ("caption", "prompt", "text") if isinstance(row, dict) and k in row]
                if not keys:
                    raise ValueError(f"line {n}: expected an object with caption, prompt or text")
                items.append(row[keys[0]])
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise DatasetConfigError(f"{what}={os.fspath(path)!r}: {err}") from None
    bad = [i for i, x in enumerate(items) if not isinstance(x, str) or not x.strip()]
    if bad:
        raise DatasetConfigError(f"{what}={os.fspath(path)!r}: entries {bad[:5]} are not non-empty strings")
    if not items:
        raise DatasetConfigError(f"{what}={os.fspath(path)!r}: no prompts")
    return [x.strip() for x in items]


# -- discovery ------------------------------------------------------------------------------------------------
def discover(datasets: list[DatasetSpec]) -> Discovery:
    """All candidate items, datasets in order, each dataset's files sorted by relative path."""
    found = Discovery([], {}, [])
    for ds in datasets:
        if ds.type == "prompts":
            prompts = read_prompts(ds.prompts_file, f"{ds.id}: prompts_file")
            cands = [Item(f"{ds.id}/{i:08d}", ds.id, None, p, i) for i, p in enumerate(prompts)]
            found.items.extend(_subset(cands, ds))
        elif ds.type == "tfds":
            n = len(_tfds_source(ds))
            cands = [Item(f"{ds.id}/{ds.tfds['split']}/{i:08d}", ds.id, None, None, i) for i in range(n)]
            found.items.extend(_subset(cands, ds))
        else:
            _discover_local(ds, found)
    return found


def _subset(items: list[Item], ds: DatasetSpec) -> list[Item]:
    """SimpleTuner's max_num_samples: the items with the lowest crc32(key) (ties by key), in their original order.
    Stable and nested: a smaller max_num_samples keeps a subset, a new file displaces at most one item."""
    if ds.max_num_samples is None or len(items) <= ds.max_num_samples:
        return items
    ranked = sorted(range(len(items)), key=lambda i: (zlib.crc32(items[i].key.encode("utf-8")), items[i].key))
    return [items[i] for i in sorted(ranked[: max(ds.max_num_samples, 0)])]


def _discover_local(ds: DatasetSpec, found: Discovery) -> None:
    root = Path(ds.instance_data_dir).absolute()
    if not root.is_dir():
        raise DatasetConfigError(f"{ds.id}: instance_data_dir={ds.instance_data_dir!r} is not a directory "
                                 f"(relative paths are resolved against the working directory {os.getcwd()})")
    wanted = IMAGE_EXTENSIONS if ds.clip.image else VIDEO_EXTENSIONS
    files = []
    seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of every folder listed -> its relative path
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), rel_dir)
        if first != rel_dir:  # a symlink loop, or a second link to a folder: its files are listed once
            dirnames[:] = []
            _note(found.notes, ds.id, rel_dir, f"folder {str(root / rel_dir)!r} is the folder {first!r} of "
                  "instance_data_dir reached again through a symlink (a loop, or a second link to it): not listed "
                  "again")
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    cands = []
    for path in files:
        ext = path.suffix.lower().lstrip(".")
        rel = path.relative_to(root).as_posix()
        if ext in wanted:
            cands.append((rel, path))
        elif ext in IMAGE_EXTENSIONS and not ds.clip.image:
            found.skipped[f"{ds.id}/{rel}"] = {"dataset": ds.id, "path": str(path), "reason": "not_a_video",
                                               "detail": "an image file in a video dataset"}
    if len(cands) > (ds.max_num_samples or len(cands)):
        keep = {i.key for i in _subset([Item(f"{ds.id}/{r}", ds.id) for r, _ in cands], ds)}
        cands = [(r, p) for r, p in cands if f"{ds.id}/{r}" in keep]
    table = _caption_table(ds, root, found.notes)
    multi = 0
    for rel, path in cands:
        key = f"{ds.id}/{rel}"
        try:
            caption, lines = _caption(ds, root, rel, path, table)
        except Skip as s:
            found.skipped[key] = {"dataset": ds.id, "path": str(path), "reason": s.reason, "detail": s.detail}
            continue
        multi += lines > 1
        found.items.append(Item(key, ds.id, str(path), caption))
    if multi:
        _note(found.notes, ds.id, "caption_strategy", f"{multi} caption files hold several lines: the first line is "
              "used (set disable_multiline_split to use the whole text)")
    if table is not None:
        for ident, rels in sorted(table.shared().items()):
            _note(found.notes, ds.id, f"{ds.caption_strategy}.{table.column}", f"identifier {ident!r} in "
                  f"{table.path} captions {len(rels)} files: {', '.join(rels)}; give each row its file's extension "
                  "(or relative path) if they differ")


def _caption(ds: DatasetSpec, root: Path, rel: str, path: Path, table: _CaptionTable | None) -> tuple[str, int]:
    lines = 1
    if ds.caption_strategy == "textfile":
        txt = path.with_suffix(".txt")
        try:
            text = txt.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise Skip("missing_caption", f"no caption file {txt.name}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Skip("missing_caption", f"unreadable caption file {txt.name} ({e})") from None
        parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        lines = len(parts)
        caption = text.strip() if ds.disable_multiline_split else (parts[0] if parts else "")
    elif ds.caption_strategy == "filename":
        caption = " ".join(path.stem.replace("_", " ").split())
    elif ds.caption_strategy == "instanceprompt":
        caption = ds.instance_prompt
    else:
        caption = table.lookup(rel) or ""
    if ds.only_instance_prompt:
        caption = ds.instance_prompt
    elif ds.prepend_instance_prompt and caption:
        caption = f"{ds.instance_prompt} {caption}"
    if not caption or not caption.strip():
        raise Skip("missing_caption", f"empty caption ({ds.caption_strategy})")
    return caption.strip(), lines


_MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS


def _strip_media_ext(name: str) -> str | None:
    """`name` without its extension when that is a known media extension (any case), else None."""
    stem, ext = os.path.splitext(name)
    return stem if stem and ext[1:].lower() in _MEDIA_EXTENSIONS else None


class _CaptionTable:
    """parquet / jsonl captions by identifier. `lookup(rel)`: the row of the exact relative path, else of the path
    without its media extension (rows whose identifier has no media extension), else the same two by file name
    (rows without a folder). `shared()`: identifiers that matched more than one file."""

    def __init__(self, path: Path, column: str):
        self.path, self.column = path, column
        self.exact: dict[str, str] = {}  # identifier as given (relative, "./" dropped) -> caption
        self.bare: dict[str, str] = {}  # identifiers without a media extension -> caption
        self.used: dict[str, list[str]] = collections.defaultdict(list)  # identifier -> the files it captions

    def add(self, ident: str, caption: str) -> None:
        self.exact[ident] = caption
        if _strip_media_ext(ident) is None:
            self.bare[ident] = caption

    def lookup(self, rel: str) -> str | None:
        if rel in self.exact:
            self.used[rel].append(rel)
            return self.exact[rel]
        stem = _strip_media_ext(rel) or rel
        name, name_stem = os.path.basename(rel), os.path.basename(stem)
        for ident, table in ((stem, self.bare), (name, self.exact), (name_stem, self.bare)):
            if ident in table:
                self.used[ident].append(rel)
                return table[ident]
        return None

    def shared(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.used.items() if len(v) > 1}


def _caption_table(ds: DatasetSpec, root: Path, notes: list) -> _CaptionTable | None:
    """parquet / jsonl captions (see _CaptionTable); notes on identifiers that can never match."""
    if ds.caption_strategy not in ("parquet", "jsonl"):
        return None
    cfg = dict(ds.parquet)
    if ds.caption_strategy == "jsonl" and not cfg.get("path"):
        cfg = {"path": str(root / "metadata.jsonl"), "filename_column": "file_name", "caption_column": "caption",
               "fallback_caption_column": "text", **cfg}
    path = Path(cfg["path"])
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif path.suffix == ".jsonl":
            rows = []
            for n, ln in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if ln.strip():
                    try:
                        rows.append(json.loads(ln))
                    except ValueError as e:
                        raise ValueError(f"line {n}: {e}") from None
        else:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, ImportError) as e:
        raise DatasetConfigError(f"{ds.id}: caption table {str(path)!r} unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list):
        raise DatasetConfigError(f"{ds.id}: caption table {str(path)!r}: expected a list of rows, got "
                                 f"{type(rows).__name__}")
    fcol, ccol = cfg.get("filename_column", "filename"), cfg.get("caption_column", "caption")
    fallback = cfg.get("fallback_caption_column")
    table = _CaptionTable(path, fcol)
    outside = []
    for row in rows:
        if not isinstance(row, dict) or row.get(fcol) is None:
            continue
        ident = str(row[fcol]).lstrip("\ufeff")
        if os.path.isabs(ident):  # an absolute path: relative to instance_data_dir when it lies under it
            rel = _relative_to(ident, root)
            if rel is None:
                outside.append(ident)
                continue
            ident = rel
        while ident.startswith("./"):
            ident = ident[2:]
        cap = row.get(ccol) or (row.get(fallback) if fallback else None)
        if isinstance(cap, (list, tuple)):  # SimpleTuner multi-captions: the first
            cap = next((c for c in cap if c), None)
        if isinstance(cap, bytes):
            cap = cap.decode("utf-8", "replace")
        if cap:
            table.add(ident, str(cap).lstrip("\ufeff"))
    if outside:
        _note(notes, ds.id, f"{ds.caption_strategy}.{fcol}", f"{len(outside)} absolute paths in {str(path)!r} are not "
              f"under instance_data_dir {str(root)!r} and caption nothing (e.g. {outside[0]!r})")
    return table


def _relative_to(ident: str, root: Path) -> str | None:
    """Absolute `ident` as a posix path relative to `root` (also through symlinks), or None when outside it."""
    for a, b in ((Path(ident), root), (Path(os.path.realpath(ident)), Path(os.path.realpath(root)))):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    return None


# -- loading ---------------------------------------------------------------------------------------------------
_TFDS: dict[tuple, Any] = {}


def _tfds_source(ds: DatasetSpec):
    key = (ds.tfds["name"], ds.tfds["split"], ds.tfds["data_dir"])
    if key not in _TFDS:
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DatasetConfigError(f"{ds.id}: reading TFDS datasets needs tensorflow_datasets: "
                                     "pip install tensorflow-datasets") from None
        try:
            _TFDS[key] = tfds.data_source(ds.tfds["name"], split=ds.tfds["split"], data_dir=ds.tfds["data_dir"])
        except Exception as e:  # tfds raises many types (not found, wrong format, missing tensorflow)
            raise DatasetConfigError(f"{ds.id}: cannot open TFDS dataset {ds.tfds['name']!r} split "
                                     f"{ds.tfds['split']!r} ({type(e).__name__}: {e})") from None
    return _TFDS[key]


def load(item: Item, ds: DatasetSpec) -> tuple[np.ndarray, str]:
    """(clip (F, H, W, 3) uint8, caption) for an item; raises Skip."""
    clip = ds.clip
    if ds.type != "tfds":
        return load_clip(item.path, clip), item.caption
    try:
        example = _tfds_source(ds)[item.index]
    except DatasetConfigError:
        raise
    except Exception as e:
        raise Skip("unreadable", f"TFDS record {item.index} ({type(e).__name__}: {e})") from None
    vk, ck = ds.tfds["video_key"], ds.tfds["caption_key"]
    if vk not in example or ck not in example:
        raise DatasetConfigError(f"{ds.id}: TFDS features {sorted(example)} lack video_key={vk!r} or "
                                 f"caption_key={ck!r}")
    caption = example[ck]
    caption = caption.decode("utf-8", "replace") if isinstance(caption, (bytes, np.bytes_)) else str(caption)
    if not caption.strip():
        raise Skip("missing_caption", "empty caption")
    value = example[vk]
    if isinstance(value, (bytes, np.bytes_)):
        return load_clip(bytes(value), clip), caption.strip()
    return prepare_frames(value, clip), caption.strip()


def _load_or_skip(item: Item, ds: DatasetSpec) -> tuple[np.ndarray, str] | Skip:
    try:
        return load(item, ds)
    except Skip as s:
        return s
    except DatasetConfigError:
        raise
    except Exception as e:  # a decoder failing in an unexpected way is still a bad file, not a stopped run
        return Skip("unreadable", f"{type(e).__name__}: {e}")


def load_many(items: list[Item], datasets: Mapping[str, DatasetSpec],
              threads: int = 4) -> Iterator[tuple[Item, tuple[np.ndarray, str] | Skip]]:
    """(item, (clip, caption) or the Skip) in item order, loaded by `threads` threads at most 2 x threads ahead."""
    with ThreadPoolExecutor(threads) as pool:
        queue: collections.deque = collections.deque()
        it = iter(items)
        for x in it:
            queue.append((x, pool.submit(_load_or_skip, x, datasets[x.dataset])))
            if len(queue) >= 2 * threads:
                break
        while queue:
            x, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(_load_or_skip, nxt, datasets[nxt.dataset])))
            yield x, fut.result()


def with_alignment(datasets: list[DatasetSpec], alignment: int) -> list[DatasetSpec]:
    return [replace(d, clip=replace(d.clip, alignment=alignment)) for d in datasets]
