"""UMT5 text encoder (transformers' `UMT5EncoderModel`) in Flax linen, numerically transformers' own.

Wan pipelines encode prompts with `google/umt5-xxl`'s encoder. This is a T5 v1.1 encoder (pre-norm RMSNorm without
mean subtraction or bias, gated-GELU feed-forward with the tanh GELU, no biases, unscaled dot-product attention with
bucketed relative position bias) with UMT5's one difference: EVERY layer owns its relative attention bias table
(T5 shares layer 0's).

Layers are one `nn.scan` over parameters stacked [num_layers, ...]; the converters in `wanjax.text_io` stack and
unstack transformers' per-layer tensors. Kernels are (in, out), the transpose of torch's Linear weights.

Dtypes: matmuls take the weights' dtype (bf16 for a bf16 checkpoint) and accumulate in float32; the residual stream,
norms, softmax and activations are float32; the output has the weights' dtype. In float32 this is exactly
transformers' computation; in bf16 it is at least as accurate as transformers' (which also keeps `wo` in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32

# config.json keys that describe no architecture wanjax needs: transformers bookkeeping, generation and training
# defaults, and keys transformers itself ignores or derives for `UMT5EncoderModel` (`dense_act_fn` and
# `is_gated_act` are recomputed from `feed_forward_proj`; `tie_word_embeddings` is forced on for the T5 family;
# `scalable_attention` appears in umt5 configs but no transformers code reads it).
_IGNORED_KEYS = frozenset(
    {
        "_name_or_path", "_attn_implementation", "_commit_hash", "architectures", "model_type", "torch_dtype",
        "dtype", "transformers_version", "tokenizer_class", "use_cache", "output_past", "is_encoder_decoder",
        "num_decoder_layers", "dropout_rate", "classifier_dropout", "initializer_factor", "pad_token_id",
        "eos_token_id", "bos_token_id", "decoder_start_token_id", "sep_token_id", "dense_act_fn", "is_gated_act",
        "tie_word_embeddings", "scalable_attention", "gradient_checkpointing", "return_dict", "output_attentions",
        "output_hidden_states", "torchscript", "id2label", "label2id", "num_labels", "problem_type",
        "task_specific_params", "finetuning_task", "prefix", "chunk_size_feed_forward", "tie_encoder_decoder",
        "add_cross_attention", "cross_attention_hidden_size", "pruned_heads", "max_length", "min_length",
        "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
        "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
        "use_bfloat16", "n_positions", "is_decoder",
    }
)
FEED_FORWARD_PROJ = ("gated-gelu",)


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Architecture of a UMT5 encoder, with transformers' `UMT5Config` field names; defaults are umt5-xxl (Wan)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: only {FEED_FORWARD_PROJ} is supported")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 4:
            raise ValueError("relative_attention_num_buckets and relative_attention_max_distance must be >= 4")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers(cls, cfg: dict[str, Any], *, source: str = "config") -> "UMT5Config":
        """From a transformers `config.json` dict; unknown architecture keys are refused by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown UMT5 config keys {unknown}; expected a subset of {sorted(fields)}")
        if cfg.get("is_decoder"):
            raise ValueError(f"{source}: is_decoder=true is a UMT5 decoder stack, not an encoder")
        model_type = cfg.get("model_type")
        if model_type is not None and model_type != "umt5":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'umt5'")
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def to_transformers(self) -> dict[str, Any]:
        """The config.json transformers' `UMT5EncoderModel.from_pretrained` reads."""
        out: dict[str, Any] = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5"}
        out.update(dataclasses.asdict(self))
        out.update({"is_encoder_decoder": True, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1})
        return out

    def replace(self, **changes) -> "UMT5Config":
        return dataclasses.replace(self, **changes)


# Static under jit: `jax.jit(umt5_encode)(config, params, ...)` hashes the config into the cache key.
jax.tree_util.register_static(UMT5Config)


# ---------------------------------------------------------------------------------------------------------
# Relative position buckets
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of (key - query), bidirectional: transformers' `_relative_position_bucket`.

    Computed once per length in numpy float32 with torch's operation order, so the log-spaced bucket edges land
    where transformers puts them.
    """
    rel = np.arange(length, dtype=np.int64)[None, :] - np.arange(length, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)
    )
    large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------
def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
    """Bias-free torch.nn.Linear: the input is cast to the kernel's dtype, accumulated in float32."""

    features: int
    std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _normal(self.std), (x.shape[-1], self.features), F32)
        return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=F32)


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias, in float32; output cast to the weight's dtype, then scaled."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), F32)
        h = x.astype(F32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return scale * h.astype(scale.dtype)


def gelu_new(x: jax.Array) -> jax.Array:
    """transformers' `gelu_new` (tanh approximation), in float32."""
    x = x.astype(F32)
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class UMT5Block(nn.Module):
    """One encoder layer: x + SelfAttention(norm(x)), then x + GatedFFN(norm(x)); the stream stays float32."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: jax.Array, buckets: jax.Array, mask_bias: jax.Array):
        cfg = self.config
        b, length, _ = x.shape
        h, dk = cfg.num_heads, cfg.d_kv

        # Self-attention. Mesh-TF init scales; no 1/sqrt(d_kv) (T5 folds it into the q init).
        y = T5LayerNorm(cfg.layer_norm_epsilon, name="attn_norm")(x)
        q = Linear(cfg.inner_dim, (cfg.d_model * dk) ** -0.5, name="q")(y).reshape(b, length, h, dk)
        k = Linear(cfg.inner_dim, cfg.d_model**-0.5, name="k")(y).reshape(b, length, h, dk)
        v = Linear(cfg.inner_dim, cfg.d_model**-0.5, name="v")(y).reshape(b, length, h, dk)
        table = self.param(
            "relative_attention_bias", _normal(cfg.d_model**-0.5), (cfg.relative_attention_num_buckets, h), F32
        )
        position_bias = jnp.take(table.astype(F32), buckets, axis=0).transpose(2, 0, 1)[None]  # (1, H, L, L)
        dt = y.dtype  # projections' inputs are the weights' dtype
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), k.astype(dt), preferred_element_type=F32)
        probs = jax.nn.softmax(scores + position_bias + mask_bias, axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dt), v.astype(dt), preferred_element_type=F32)
        attn = Linear(cfg.d_model, cfg.inner_dim**-0.5, name="o")(attn.reshape(b, length, cfg.inner_dim).astype(dt))
        x = x + attn

        # Gated-GELU feed-forward.
        y = T5LayerNorm(cfg.layer_norm_epsilon, name="ffn_norm")(x)
        gate = gelu_new(Linear(cfg.d_ff, cfg.d_model**-0.5, name="wi_0")(y))
        up = Linear(cfg.d_ff, cfg.d_model**-0.5, name="wi_1")(y)
        x = x + Linear(cfg.d_model, cfg.d_ff**-0.5, name="wo")(gate * up)
        return x, None  # scan's (carry, output) form


class UMT5Encoder(nn.Module):
    """Token embedding -> scanned layers -> final norm: transformers' `UMT5EncoderModel.last_hidden_state`."""

    config: UMT5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        length = input_ids.shape[1]
        embedding = self.param("embed_tokens", _normal(1.0), (cfg.vocab_size, cfg.d_model), F32)
        x = jnp.take(embedding, input_ids, axis=0).astype(F32)
        # transformers' extended mask: 0 where attended, the dtype's min where padded (added to the scores, so a
        # prompt whose keys are all masked attends uniformly instead of producing NaN).
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(F32).min).astype(F32)
        buckets = jnp.asarray(
            relative_position_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        )
        layers = nn.scan(
            UMT5Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, name="blocks")
        x, _ = layers(x, buckets, mask_bias)
        return T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------
def umt5_encode(config: UMT5Config, params: dict, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L) token ids and 0/1 attention mask -> (B, L, d_model) last_hidden_state in the weights' dtype.

    Padded positions get values too (as in transformers); Wan's convention zeroes them afterwards
    (`wanjax.text_io.encode_prompts`).
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be (B, L)")
    return UMT5Encoder(config).apply({"params": params}, input_ids, attention_mask)


def param_shapes(config: UMT5Config) -> dict:
    """The params pytree of `config` as float32 `jax.ShapeDtypeStruct`s, allocating nothing."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda i, m: UMT5Encoder(config).init(jax.random.key(0), i, m), ids, ids)
    return shapes["params"]


def init_text_encoder_params(config: UMT5Config, rng: jax.Array, dtype=F32) -> dict:
    """Random parameters with transformers' (Mesh-TF) init scales; norm scales are ones."""
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.jit(lambda r: UMT5Encoder(config).init(r, ids, ids)["params"])(rng)
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
