"""wanjax: Wan 2.1 / 2.2 video-diffusion training in JAX. Public API."""

from wanjax import lora
from wanjax.lora import LoraWeights, init_lora, load_lora, merge_lora, save_lora
from wanjax.models.config import WanConfig
from wanjax.models.text_encoder import UMT5Config, umt5_encode
from wanjax.models.transformer import init_params, param_shapes, transformer_forward
from wanjax.models.vae import VaeConfig, vae_decode, vae_encode
from wanjax.text_io import encode_prompts, load_text_encoder
from wanjax.transformer_io import load_transformer, save_transformer
from wanjax.vae_io import load_vae, save_vae
from wanjax.video_out import to_uint8_frames, write_mp4


def __getattr__(name):
    # `wanjax.sample` (the callable sampling module, see wanjax/sample.py) is imported on first use rather than
    # here: importing it eagerly would put it in sys.modules before `python -m wanjax.sample` runs it as
    # __main__, which makes runpy warn about a double import.
    if name == "sample":
        import importlib

        return importlib.import_module("wanjax.sample")
    raise AttributeError(f"module 'wanjax' has no attribute {name!r}")


__all__ = [
    "LoraWeights",
    "UMT5Config",
    "VaeConfig",
    "WanConfig",
    "encode_prompts",
    "init_lora",
    "init_params",
    "load_lora",
    "load_text_encoder",
    "load_transformer",
    "load_vae",
    "lora",
    "merge_lora",
    "param_shapes",
    "sample",
    "save_lora",
    "save_transformer",
    "save_vae",
    "to_uint8_frames",
    "transformer_forward",
    "umt5_encode",
    "vae_decode",
    "vae_encode",
    "write_mp4",
]
