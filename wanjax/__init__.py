"""wanjax: Wan 2.1 / 2.2 video-diffusion training in JAX. Public API."""

from wanjax.models.config import WanConfig
from wanjax.models.transformer import init_params, param_shapes, transformer_forward
from wanjax.transformer_io import load_transformer, save_transformer

__all__ = [
    "WanConfig",
    "init_params",
    "load_transformer",
    "param_shapes",
    "save_transformer",
    "transformer_forward",
]
