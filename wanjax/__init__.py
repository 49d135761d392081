"""wanjax: Wan 2.1 / 2.2 video-diffusion training in JAX. Public API."""

from wanjax import lora
from wanjax.lora import LoraWeights, init_lora, load_lora, merge_lora, save_lora
from wanjax.models.config import WanConfig
from wanjax.models.transformer import init_params, param_shapes, transformer_forward
from wanjax.transformer_io import load_transformer, save_transformer

__all__ = [
    "LoraWeights",
    "WanConfig",
    "init_lora",
    "init_params",
    "load_lora",
    "load_transformer",
    "lora",
    "merge_lora",
    "param_shapes",
    "save_lora",
    "save_transformer",
    "transformer_forward",
]
