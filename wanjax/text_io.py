"""UMT5 text encoder I/O: transformers folders, the T5 tokenizer without transformers, Wan's prompt encoding.

Everything here runs without torch or transformers (the caching job runs on TPU hosts that have neither):
weights stream through `wanjax.safetensors_io`, the tokenizer is the `tokenizers` library on the folder's
`tokenizer.json`, rebuilt the way transformers 5 rebuilds a `T5Tokenizer` so ids match `AutoTokenizer` exactly.

Checkpoint keys are transformers' `UMT5EncoderModel` state dict (`shared.weight`, `encoder.block.{i}.layer.0.
SelfAttention.q.weight`, ...); wanjax stacks the per-layer tensors [num_layers, ...] and transposes Linear weights.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wanjax import safetensors_io as stio
from wanjax import weights
from wanjax.models.text_encoder import UMT5Config, init_text_encoder_params, param_shapes, umt5_encode  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

MODEL_STEM = "model"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default ("5GB")
WAN_MAX_LENGTH = 512
EMBED_KEY, EMBED_ALIAS = "shared.weight", "encoder.embed_tokens.weight"
# wanjax block param path -> (transformers key after `encoder.block.{i}.`, transpose?)
_LAYER_KEYS = {
    ("attn_norm", "scale"): ("layer.0.layer_norm.weight", False),
    ("q", "kernel"): ("layer.0.SelfAttention.q.weight", True),
    ("k", "kernel"): ("layer.0.SelfAttention.k.weight", True),
    ("v", "kernel"): ("layer.0.SelfAttention.v.weight", True),
    ("o", "kernel"): ("layer.0.SelfAttention.o.weight", True),
    ("relative_attention_bias",): ("layer.0.SelfAttention.relative_attention_bias.weight", False),
    ("ffn_norm", "scale"): ("layer.1.layer_norm.weight", False),
    ("wi_0", "kernel"): ("layer.1.DenseReluDense.wi_0.weight", True),
    ("wi_1", "kernel"): ("layer.1.DenseReluDense.wi_1.weight", True),
    ("wo", "kernel"): ("layer.1.DenseReluDense.wo.weight", True),
}


# ---------------------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers' Wan pipelines: `prompt_clean`)
# ---------------------------------------------------------------------------------------------------------
try:  # diffusers applies ftfy.fix_text only when ftfy is installed; so do we.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None

# The `regex` module's `\s` (Unicode White_Space), which diffusers uses; Python's `re` `\s` also matches \x1c-\x1f.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean`: [ftfy.fix_text], HTML-unescape twice, collapse whitespace, strip."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
_T5_CLASSES = {"T5Tokenizer", "T5TokenizerFast"}
_AS_IS_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _added_token(spec: dict):
    from tokenizers import AddedToken

    keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(spec["content"], **{k: spec[k] for k in keys if k in spec})


def _precompiled_charsmap(normalizer: dict | None) -> str | None:
    if not normalizer:
        return None
    parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    return next((n["precompiled_charsmap"] for n in parts if n.get("type") == "Precompiled"), None)


def _t5_pretokenizer_and_decoder():
    """T5's pre-tokenizer (split on whitespace, then '▁'-prefix every word) and the matching decoder."""
    from tokenizers import decoders, pre_tokenizers

    meta = dict(replacement="▁", prepend_scheme="always", split=True)
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**meta)])
    return split, decoders.Metaspace(**meta)


def _t5_backend(tok_json: dict, cfg: dict, specials: dict):
    """The backend transformers 5's `T5Tokenizer` builds from a tokenizer.json: only the Unigram vocab and a
    Precompiled charsmap survive; the pre-tokenizer and `$A </s>` template are T5's own."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers
    from tokenizers.models import Unigram

    model = tok_json.get("model", {})
    if model.get("type") != "Unigram":
        raise ValueError(f"a T5 tokenizer needs a Unigram model, tokenizer.json has {model.get('type')!r}")
    backend = Backend(Unigram([tuple(v) for v in model["vocab"]], unk_id=2, byte_fallback=False))
    charsmap = _precompiled_charsmap(tok_json.get("normalizer"))
    if charsmap is not None:
        backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap))
    backend.pre_tokenizer, backend.decoder = _t5_pretokenizer_and_decoder()

    # Added tokens in transformers' order: the saved ones by id, then named specials, then sentinels.
    if "added_tokens_decoder" in cfg:
        saved = sorted((int(i), t) for i, t in cfg["added_tokens_decoder"].items())
    else:
        saved = sorted((t["id"], t) for t in tok_json.get("added_tokens", []))
    to_add = [_added_token(t) for _, t in saved]
    present = {t.content for t in to_add}
    additional = [_token_str(t) for t in (cfg.get("additional_special_tokens") or [])]
    if not any("<extra_id_" in t for t in additional):  # T5Tokenizer's sentinels, 100 unless configured
        additional += [f"<extra_id_{i}>" for i in range(cfg.get("extra_ids", 100))]
    extra = cfg.get("extra_special_tokens")
    additional += [_token_str(t) for t in extra] if isinstance(extra, list) else []
    named = [specials[k] for k in _NAMED_SPECIALS if specials.get(k)]
    for content in named + additional:
        if content not in present:
            present.add(content)
            to_add.append(_added_token({"content": content, "special": True, "normalized": False}))
    backend.add_tokens(to_add)

    backend.post_processor = _eos_template(backend.token_to_id(specials["eos_token"]))
    return backend


def _eos_template(eos_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
    )


class Tokenizer:
    """A pipeline's T5 tokenizer (`tokenizer/` folder) on the `tokenizers` library, transformers-free.

    `__call__` is Wan's call `tokenizer(prompts, padding="max_length", max_length=..., truncation=True,
    add_special_tokens=True, return_attention_mask=True)`: ids end with `</s>`, padded with `<pad>` to max_length.
    """

    def __init__(self, backend, *, pad_token: str, padding_side: str = "right", truncation_side: str = "right",
                 files: dict[str, bytes] | None = None):
        self.backend = backend
        self.pad_token = pad_token
        self.pad_token_id = backend.token_to_id(pad_token)
        if self.pad_token_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.files = dict(files or {})

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`) as transformers 5 would."""
        from tokenizers import Tokenizer as Backend

        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (a sentencepiece-only tokenizer folder is not supported)")
        files = {name: (d / name).read_bytes() for name in _TOKENIZER_FILES if (d / name).is_file()}
        tok_json = json.loads(files["tokenizer.json"])
        cfg = json.loads(files.get("tokenizer_config.json", b"{}"))
        specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        if "added_tokens_decoder" not in cfg and "special_tokens_map.json" in files:  # transformers' legacy merge
            legacy = json.loads(files["special_tokens_map.json"])
            specials.update({k: _token_str(v) for k, v in legacy.items() if k in _NAMED_SPECIALS})
        specials.update({k: _token_str(cfg[k]) for k in _NAMED_SPECIALS if cfg.get(k) is not None})
        name = cfg.get("tokenizer_class") or "T5Tokenizer"
        if name in _T5_CLASSES:
            backend = _t5_backend(tok_json, cfg, specials)
        elif name in _AS_IS_CLASSES:
            backend = Backend.from_str(files["tokenizer.json"].decode())
        else:
            raise ValueError(f"{d}: tokenizer_class {name!r} is not supported (Wan pipelines use T5Tokenizer)")
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, pad_token=specials["pad_token"], padding_side=cfg.get("padding_side", "right"),
                   truncation_side=cfg.get("truncation_side", "right"), files=files)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: str | Sequence[str], max_length: int = WAN_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both (B, max_length) int32."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        self.backend.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                    pad_token=self.pad_token, length=max_length)
        encodings = self.backend.encode_batch(prompts, add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(prompts), max_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(prompts), max_length)
        return ids, mask

    def save(self, directory: str | os.PathLike) -> None:
        """Write the files this tokenizer was loaded from (AutoTokenizer and `from_directory` both read them)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            _atomic_write(d / name, data)


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


# A small English + Chinese corpus for the tiny pipeline's tokenizer (video-caption flavoured, like Wan prompts).
_TINY_CORPUS = """\
A cat and a dog baking a cake together in a kitchen.
The cat is carefully measuring flour, while the dog is stirring the batter with a wooden spoon.
The kitchen is cozy, with sunlight streaming through the window.
A red sports car drives along a winding mountain road at sunset.
Waves crash against the rocky shore under a cloudy sky.
A young woman walks through a busy market, smiling at the camera.
An astronaut floats slowly above the blue planet, stars shining behind him.
Close-up of raindrops falling on green leaves in a quiet forest.
A panda eats bamboo, sitting on a wooden platform in the zoo.
Two children run across a sunny field of yellow flowers.
Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images.
Worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, deformed.
A drone shot of a city at night, with lights reflecting on the river.
An old man plays the violin on a street corner while people pass by.
Snow falls gently over a small village in the mountains.
A horse gallops along the beach, its mane blowing in the wind.
Slow motion video of a hummingbird drinking nectar from a flower.
A chef slices fresh vegetables on a wooden board, steam rising from the pots behind her.
Time-lapse of clouds moving quickly over a desert canyon, shadows sweeping across the red rocks.
A golden retriever jumps into a lake to fetch a stick, splashing water everywhere.
Cinematic shot of a lighthouse on a cliff during a thunderstorm, lightning in the distance.
A ballerina spins gracefully on a dimly lit stage, her dress flowing around her.
Camera pans across a crowded train station as travelers hurry to their platforms.
A small boat sails across a calm lake surrounded by autumn trees reflecting in the water.
Macro footage of a butterfly slowly opening its wings on a purple flower.
一只猫和一只狗在厨房里一起烤蛋糕。
阳光透过窗户照进温馨的厨房。
一辆红色跑车在日落时分沿着蜿蜒的山路行驶。
海浪拍打着岩石海岸，天空中布满云朵。
色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量。
一位年轻女子穿过热闹的市场，对着镜头微笑。
宇航员在蓝色星球上方缓缓漂浮，身后星光闪烁。
雨滴落在安静森林里的绿叶上。
两个孩子在开满黄花的田野上奔跑。
夜晚城市的航拍画面，灯光倒映在河面上。
一位厨师在木板上切新鲜的蔬菜，身后的锅里冒着热气。
一只金毛犬跳进湖里去捡木棍，水花四溅。
"""


def train_tiny_tokenizer(
    directory: str | os.PathLike, *, vocab_size: int = 384, corpus: Sequence[str] | None = None
) -> Path:
    """Train a small T5-style Unigram tokenizer offline and save it as a transformers tokenizer folder.

    `<pad>` = 0, `</s>` = 1, `<unk>` = 2 as in T5; WhitespaceSplit + Metaspace pre-tokenizer and a `$A </s>`
    post-processor, i.e. exactly the backend transformers' `T5Tokenizer` builds, so AutoTokenizer and `Tokenizer`
    agree. Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json. Deterministic for a given corpus.
    The vocabulary may come out smaller than `vocab_size` when the corpus is too small to fill it.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, trainers

    lines = [s for s in (corpus if corpus is not None else _TINY_CORPUS.splitlines()) if s.strip()]
    backend = Backend(models.Unigram())
    backend.pre_tokenizer, backend.decoder = _t5_pretokenizer_and_decoder()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(lines, trainer)
    # Make the file byte-identical across runs: the trainer's parallel EM leaves noise in the scores' last bits
    # (rounded away), and the characters it re-inserts below every learned piece get their (evenly spaced) scores
    # in hash order (given back in character order). Pieces are then ordered by (score, text) after the specials.
    tok_json = json.loads(backend.to_str())
    head, rest = tok_json["model"]["vocab"][:3], [(p, round(s, 6)) for p, s in tok_json["model"]["vocab"][3:]]
    floor = min((s for p, s in rest if len(p) > 1), default=float("inf"))
    tail = sorted((v for v in rest if len(v[0]) == 1 and v[1] < floor))
    scores = sorted((s for _, s in tail), reverse=True)
    rest = [v for v in rest if v not in tail] + [(p, s) for (p, _), s in zip(tail, scores)]
    tok_json["model"]["vocab"] = head + [list(v) for v in sorted(rest, key=lambda v: (-v[1], v[0]))]
    backend = Backend.from_str(json.dumps(tok_json))
    backend.post_processor = _eos_template(1)
    ids = [backend.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special token ids came out {ids}, expected [0, 1, 2]")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", **specials, "extra_ids": 0, "additional_special_tokens": [],
              "model_max_length": WAN_MAX_LENGTH, "padding_side": "right", "truncation_side": "right"}
    _atomic_write(d / "tokenizer.json", backend.to_str(pretty=True))
    _atomic_write(d / "tokenizer_config.json", json.dumps(config, indent=2))
    _atomic_write(d / "special_tokens_map.json", json.dumps(specials, indent=2))
    return d


# ---------------------------------------------------------------------------------------------------------
# Weights: transformers `UMT5EncoderModel` folders <-> wanjax params
# ---------------------------------------------------------------------------------------------------------
def _key_map(config: UMT5Config) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
    """transformers key -> (wanjax param path, layer or None, transpose?), in checkpoint order."""
    out = {EMBED_KEY: (("embed_tokens",), None, False)}
    for i in range(config.num_layers):
        for sub, (suffix, transpose) in _LAYER_KEYS.items():
            out[f"encoder.block.{i}.{suffix}"] = (("blocks", *sub), i, transpose)
    out["encoder.final_layer_norm.weight"] = (("final_layer_norm", "scale"), None, False)
    return out


def expected_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """transformers key -> shape, derived from the module's own params (`jax.eval_shape`)."""
    shapes = {p: tuple(s.shape) for p, s in weights.leaves_by_path(param_shapes(config)).items()}
    out = {}
    for key, (path, layer, transpose) in _key_map(config).items():
        shape = shapes[path][1:] if layer is not None else shapes[path]
        out[key] = shape[::-1] if transpose else shape
    return out


def _open_store(directory: Path) -> stio.TensorStore:
    index = directory / f"{MODEL_STEM}.safetensors.index.json"
    if index.exists():
        return stio.TensorStore.from_index(index)
    single = directory / f"{MODEL_STEM}.safetensors"
    if single.exists():
        return stio.TensorStore.from_paths([single])
    raise FileNotFoundError(f"{directory}: neither {single.name} nor {index.name} found")


def _checked_names(store: stio.TensorStore, config: UMT5Config, source: str) -> dict[str, str]:
    """Expected key -> stored key, after naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(config)
    stored = set(store.keys())
    names = {k: k for k in expected if k in stored}
    # The encoder embeds with `encoder.embed_tokens.weight`, tied to `shared.weight`; files hold either or both
    # (transformers unties them if both are saved and differ, and the encoder then uses its own).
    if EMBED_ALIAS in stored:
        names[EMBED_KEY] = EMBED_ALIAS
    missing = [k for k in expected if k not in names]
    extra = sorted(stored - set(expected) - {EMBED_ALIAS})
    problems = []
    if missing:
        shown = ", ".join(f"{k} {list(expected[k])}" for k in missing[:8])
        problems.append(f"missing tensors: {shown}" + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
    if extra:
        problems.append(f"unexpected tensors (not in a UMT5 encoder with this config): {extra[:8]}")
    for key in sorted(stored & (set(expected) | {EMBED_ALIAS})):
        want = expected[EMBED_KEY if key == EMBED_ALIAS else key]
        if tuple(store.info(key).shape) != want:
            problems.append(f"tensor {key!r} has shape {list(store.info(key).shape)}, expected {list(want)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return names


def _materialize(store: stio.TensorStore, config: UMT5Config, names: dict[str, str], dtype, shardings) -> dict:
    """Device params, one tensor at a time; with `shardings`, each device reads only the layers it holds."""
    by_path: dict[tuple[str, ...], list[tuple[int | None, str, bool]]] = {}
    for key, (path, layer, transpose) in _key_map(config).items():
        by_path.setdefault(path, []).append((layer, names[key], transpose))
    flat_shard = None
    if shardings is not None:
        flat_shard = weights.leaves_by_path(shardings)

    def read(path, layers: slice | None = None) -> np.ndarray:
        entries = by_path[path]
        dt = np.dtype(store.info(entries[0][1]).dtype if dtype is None else jnp.dtype(dtype))
        one = lambda name, t: (lambda a: a.T if t else a)(store.read(name)).astype(dt, copy=False)  # noqa: E731
        if entries[0][0] is None:
            return np.ascontiguousarray(one(entries[0][1], entries[0][2]))
        chosen = entries[layers] if layers is not None else entries
        return np.stack([one(name, t) for _, name, t in chosen])

    def load(keys, leaf):
        path = weights.path_names(keys)
        if flat_shard is None:
            return jax.device_put(read(path)).block_until_ready()

        def callback(index):
            stacked = path[0] == "blocks"
            host = read(path, index[0] if stacked else None)
            rest = index[1:] if stacked else index
            return np.ascontiguousarray(host[(slice(None),) * stacked + tuple(rest)])

        return jax.make_array_from_callback(tuple(leaf.shape), flat_shard[path], callback).block_until_ready()

    return jax.tree_util.tree_map_with_path(load, param_shapes(config))


def load_text_encoder(
    path: str | os.PathLike,
    *,
    subfolder: str | None = "text_encoder",
    tokenizer_subfolder: str | None = "tokenizer",
    dtype=jnp.float32,
    shardings=None,
) -> tuple[UMT5Config, dict, Tokenizer | None]:
    """(config, params, tokenizer) from a diffusers pipeline folder (or, with subfolder=None, a model folder).

    `path/subfolder` holds transformers' config.json and model.safetensors (or a sharded
    model.safetensors.index.json); the tokenizer comes from `path/tokenizer_subfolder` (None: no tokenizer).
    `dtype`: parameter dtype (None keeps the stored one). `shardings`: a tree of Shardings matching the params,
    to place each device's slice without assembling the model on one device.
    """
    root = Path(path)
    model_dir = root / subfolder if subfolder else root
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a transformers UMT5EncoderModel folder)")
    config = UMT5Config.from_transformers(json.loads(cfg_path.read_text()), source=str(cfg_path))
    store = _open_store(model_dir)
    params = _materialize(store, config, _checked_names(store, config, str(model_dir)), dtype, shardings)
    tokenizer = Tokenizer.from_directory(root / tokenizer_subfolder) if tokenizer_subfolder is not None else None
    logger.info("loaded UMT5 encoder from %s: %d layers, d_model %d", model_dir, config.num_layers, config.d_model)
    return config, params, tokenizer


def save_text_encoder(
    config: UMT5Config,
    params: dict,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write a transformers folder (config.json + model.safetensors, sharded above `max_shard_bytes`) that
    `UMT5EncoderModel.from_pretrained(path)` loads. Streams one layer at a time; returns the files written."""
    if jax.process_index() != 0:
        return []
    leaves = weights.leaves_by_path(params)
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in leaves.values()):
        raise ValueError("params span several processes: gather or replicate them before save_text_encoder")
    shapes = expected_shapes(config)
    if set(leaves) != set(weights.leaves_by_path(param_shapes(config))):
        raise ValueError(f"params do not match {config}: got {sorted('/'.join(p) for p in leaves)[:8]} ...")
    keymap = _key_map(config)
    out_dtype = lambda p: np.dtype(leaves[p].dtype if dtype is None else jnp.dtype(dtype))  # noqa: E731
    specs = [(k, out_dtype(p), shapes[k]) for k, (p, _, _) in keymap.items()]

    def produce(key: str) -> np.ndarray:
        path, layer, transpose = keymap[key]
        arr = np.asarray(leaves[path] if layer is None else leaves[path][layer])  # one layer off the device
        arr = arr.T if transpose else arr
        return np.ascontiguousarray(arr).astype(dtype if dtype is not None else arr.dtype, copy=False)

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}  # transformers refuses safetensors without it
    files = stio.write_sharded(d, MODEL_STEM, specs, produce, max_shard_bytes=max_shard_bytes, metadata=meta)
    _atomic_write(d / "config.json", json.dumps(config.to_transformers(), indent=2))
    return [*files, "config.json"]


# ---------------------------------------------------------------------------------------------------------
# Prompt encoding (diffusers' `WanPipeline._get_t5_prompt_embeds`)
# ---------------------------------------------------------------------------------------------------------
@jax.jit
def _encode_zero_padded(config: UMT5Config, params: dict, input_ids: jax.Array, attention_mask: jax.Array):
    """Encode, then zero every position at or past the prompt's true length (Wan's cut-and-zero-pad)."""
    hidden = umt5_encode(config, params, input_ids, attention_mask)
    lengths = jnp.sum(attention_mask > 0, axis=1)
    keep = jnp.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype)), lengths


def encode_prompts(
    config: UMT5Config,
    params: dict,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    max_length: int = WAN_MAX_LENGTH,
    *,
    batch_size: int | None = None,
    clean: bool = True,
    return_lengths: bool = False,
) -> jax.Array | tuple[jax.Array, np.ndarray]:
    """Wan's prompt embeddings: (B, max_length, d_model), true-length rows then exact zeros.

    Prompts are cleaned like diffusers (`prompt_clean`), tokenised to max_length (truncated, `</s>` appended) and
    encoded with the attention mask. The model call is jitted once per (batch, max_length): with `batch_size`,
    prompts go in fixed-size chunks (the last one padded with empty prompts), so any number of prompts compiles
    once. `return_lengths` also gives the true token counts (B,) int32, e.g. to cache only the true-length rows.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if clean:
        prompts = [prompt_clean(p) for p in prompts]
    n = len(prompts)
    chunk = batch_size or max(n, 1)
    outs, lens = [], []
    for start in range(0, max(n, 1), chunk):
        part = prompts[start : start + chunk]
        ids, mask = tokenizer(part + [""] * (chunk - len(part)), max_length)
        emb, length = _encode_zero_padded(config, params, jnp.asarray(ids), jnp.asarray(mask))
        outs.append(emb[: len(part)])
        lens.append(np.asarray(length[: len(part)], np.int32))
    embeds = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return (embeds, np.concatenate(lens)) if return_lengths else embeds
