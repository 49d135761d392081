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
    "save_lora",
    "save_transformer",
    "save_vae",
    "transformer_forward",
    "umt5_encode",
    "vae_decode",
    "vae_encode",
]
