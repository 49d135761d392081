"""Where the base model is read from, from SimpleTuner's keys, resolved in one place (trainer, caching, model card).

- `model_flavour` (SimpleTuner's names): the default repo and the transformer subfolder (Wan 2.2 A14B: `transformer`
  is the high-noise expert, `transformer_2` the low-noise one).
- `pretrained_model_name_or_path`: the diffusers pipeline (folder or hub id) whose vae/, text_encoder/, tokenizer/
  and scheduler/ are used; None: the flavour's repo, else Wan2.1 T2V 1.3B. A hub id that is not the flavour's repo
  is refused (the flavour would otherwise be silently ignored).
- `pretrained_transformer_model_name_or_path`: a transformer from elsewhere (a fine-tune: a pipeline or transformer
  folder, a hub id, or a single .safetensors file); None: the pipeline's.
- `pretrained_transformer_subfolder`: its subfolder; "none" (SimpleTuner's spelling) or "": the path is the
  transformer itself; None: the flavour's expert (else "transformer") in the pipeline, and in a custom path that
  turns out to be a pipeline (`ModelSource.expert`). Naming the other expert than a -high / -low flavour's is
  refused (SimpleTuner trains the flavour's stage whatever the subfolder says).
- Image-to-video flavours are refused here, before any download: wanjax's cache holds no image conditioning.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# SimpleTuner's model flavours: (default repo, transformer subfolder).
FLAVOURS = {
    "t2v-480p-1.3b-2.1": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer"),
    "t2v-480p-14b-2.1": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer"),
    "i2v-14b-2.1": ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "transformer"),
    "i2v-14b-2.1-720p": ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "transformer"),
    "flf2v-14b-2.1": ("Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", "transformer"),
    "t2v-a14b-2.2-high": ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer"),
    "t2v-a14b-2.2-low": ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer_2"),
    "i2v-14b-2.2-high": ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "transformer"),
    "i2v-14b-2.2-low": ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "transformer_2"),
    "ti2v-5b-2.2": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "transformer"),
}
DEFAULT_FLAVOUR = "t2v-480p-1.3b-2.1"
IMAGE_FLAVOURS = ("i2v-", "flf2v-")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_repo_id(path) -> bool:
    """"org/name" that is not a local path: a hub repo id to fetch with huggingface_hub."""
    return _HUB_ID.fullmatch(str(path)) is not None and not os.path.exists(path)


def read_model_index(pipeline, *, hub_cache: bool = False) -> dict | None:
    """A pipeline's model_index.json from the local folder `pipeline`, or with `hub_cache` for a hub id from the
    local hub cache (never downloaded); None where there is none or it is not a readable JSON object."""
    path = Path(pipeline) / "model_index.json"
    if not path.is_file():
        if not hub_cache:
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(pipeline), "model_index.json")
        except Exception:  # noqa: BLE001 - not a valid repo id, unreadable cache: nothing to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def two_experts(model_index: dict) -> bool:
    """Whether a pipeline's model_index.json describes Wan 2.2 A14B's two experts: a transformer_2 and the
    boundary_ratio at which sampling switches to it."""
    return model_index.get("boundary_ratio") is not None and (model_index.get("transformer_2") or [None])[0] is not None


@dataclass(frozen=True)
class ModelSource:
    pipeline: str  # diffusers pipeline folder or hub id: vae/, text_encoder/, tokenizer/, scheduler/
    transformer: str  # the transformer checkpoint: the pipeline, or pretrained_transformer_model_name_or_path
    subfolder: str | None  # inside `transformer`; None: the path itself, or `expert` when the path is a pipeline
    expert: str = "transformer"  # the pipeline's expert this run trains: "transformer_2" for a -low flavour


def resolve_model(config) -> ModelSource:
    """The model source of a config (a ConfigDict or a dict). ValueError names the key at fault."""
    flavour = config.get("model_flavour")
    flavour_repo = flavour_sub = None
    if flavour:
        if flavour not in FLAVOURS:
            raise ValueError(f"model_flavour={flavour!r}: expected one of {sorted(FLAVOURS)}")
        flavour_repo, flavour_sub = FLAVOURS[flavour]
        if flavour.startswith(IMAGE_FLAVOURS):
            raise ValueError(f"model_flavour={flavour!r}: image-to-video training is not supported (wanjax's cache "
                             "holds no image conditioning); train a text-to-video flavour")
    path = config.get("pretrained_model_name_or_path")
    if flavour and path and looks_like_repo_id(path) and str(path).lower() != flavour_repo.lower():
        raise ValueError(f"pretrained_model_name_or_path={path!r} is not model_flavour={flavour!r}'s repo "
                         f"{flavour_repo!r}: set one of them (the other is then derived), or a local path")
    pipeline = str(path or flavour_repo or FLAVOURS[DEFAULT_FLAVOUR][0])
    custom = config.get("pretrained_transformer_model_name_or_path")
    sub = config.get("pretrained_transformer_subfolder")
    expert = flavour_sub or "transformer"
    if isinstance(sub, str) and sub.strip().lower() in ("none", ""):
        sub = None
    elif sub is None and not custom:
        sub = expert
    two_experts = flavour and flavour.endswith(("-2.2-high", "-2.2-low"))
    if two_experts and sub in ("transformer", "transformer_2") and sub != expert:
        raise ValueError(f"pretrained_transformer_subfolder={sub!r} is the other expert than model_flavour="
                         f"{flavour!r} trains ({expert!r}): drop the subfolder, or pick the flavour of that expert")
    return ModelSource(pipeline=pipeline, transformer=str(custom or pipeline), subfolder=sub, expert=expert)
