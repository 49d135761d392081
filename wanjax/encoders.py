"""The VAE and UMT5 encoders of the caching job (wanjax/cache.py): the `Encoders` interface it encodes through, and
`load_encoders`, which builds it from a Wan pipeline's vae/, text_encoder/ and tokenizer/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Encoders:
    """What caching needs from the VAE and the text encoder. `load_encoders` builds the real ones; tests pass small
    deterministic stand-ins.

    encode_video: float32 (B, 3, F, H, W) in [-1, 1], F = 4k + 1, H, W multiples of spatial_factor, B =
        video_batch_size -> normalised latents (B, latent_channels, 1 + (F - 1) // 4, H / sf, W / sf).
    encode_text: text_batch_size prompts -> (embeddings (B, text_len, text_dim), true token counts (B,)).
    """

    encode_video: Callable[[np.ndarray], Any]
    encode_text: Callable[[Sequence[str]], tuple[Any, Any]]
    latent_channels: int
    text_dim: int
    spatial_factor: int = 8
    text_len: int = 512
    video_batch_size: int = 1
    text_batch_size: int = 1
    name: str = ""


def load_encoders(pipeline_path: str, *, vae_batch_size: int = 1, text_batch_size: int = 1,
                  text_len: int = 512) -> Encoders:
    """The pipeline's VAE (batch split over this process's devices, `vae_batch_size` each) and UMT5. A hub id
    is downloaded first (vae/, text_encoder/, tokenizer/ only)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from wanjax import text_io, vae_io
    from wanjax.models import vae as vae_lib

    from wanjax.model_source import looks_like_repo_id

    path = str(pipeline_path)
    if looks_like_repo_id(path):
        import huggingface_hub as hf

        path = hf.snapshot_download(path, allow_patterns=["model_index.json", "vae/*", "text_encoder/*",
                                                          "tokenizer/*"])
    vae_cfg, vae_params = vae_io.load_vae(path, subfolder="vae")
    te_cfg, te_params, tokenizer = text_io.load_text_encoder(path, subfolder="text_encoder",
                                                             tokenizer_subfolder="tokenizer")
    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    vae_params = jax.device_put(vae_params, NamedSharding(mesh, PartitionSpec()))
    encode = jax.jit(lambda params, video: vae_lib.vae_encode(vae_cfg, params, video))
    sf = int(getattr(vae_cfg, "spatial_factor", None) or getattr(vae_cfg, "scale_factor_spatial", None) or 8)
    probe = jax.eval_shape(encode, vae_params, jax.ShapeDtypeStruct((1, 3, 1, 2 * sf, 2 * sf), jnp.float32))

    def encode_video(batch: np.ndarray) -> Any:
        return encode(vae_params, jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch"))))

    def encode_text(prompts: Sequence[str]) -> tuple[Any, Any]:
        return text_io.encode_prompts(te_cfg, te_params, tokenizer, list(prompts), max_length=text_len,
                                      batch_size=text_batch_size, return_lengths=True)

    emb, _ = encode_text([""] * text_batch_size)
    return Encoders(encode_video, encode_text, latent_channels=int(probe.shape[1]), text_dim=int(emb.shape[-1]),
                    spatial_factor=sf, text_len=text_len, video_batch_size=vae_batch_size * mesh.size,
                    text_batch_size=text_batch_size, name=str(pipeline_path))
