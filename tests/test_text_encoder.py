"""UMT5 text encoder and T5 tokenizer against transformers / diffusers on a tiny random model, built offline."""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import AutoTokenizer, UMT5EncoderModel
from transformers import UMT5Config as HFConfig

from wanjax import safetensors_io as stio
from wanjax import text_io
from wanjax.models.text_encoder import UMT5Config, init_text_encoder_params, relative_position_buckets, umt5_encode
from wanjax.text_io import Tokenizer, encode_prompts, load_text_encoder, save_text_encoder, train_tiny_tokenizer

TOL = 1e-4
PROMPTS = [
    "",
    "A cat and a dog baking a cake together in a kitchen.",
    "一只猫和一只狗在厨房里一起烤蛋糕。",
    "Snow falls gently over a small village in the mountains, " * 50,  # over 512 tokens: truncated
    "  café  naïve 😀 ｆｕｌｌ　width &amp; tabs\tand\nnewlines  ",
    "mixed 中文 and English, </s> <unk> <pad> literal specials",
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: norm weights 1 + 0.2 N, matrices N / sqrt(fan_in), bias tables and embeddings N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif "relative_attention_bias" in name or "shared" in name or "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))
    return model


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A pipeline-like folder: tokenizer/ (train_tiny_tokenizer) + text_encoder/ (save_pretrained)."""
    root = tmp_path_factory.mktemp("pipe")
    train_tiny_tokenizer(root / "tokenizer")
    hf_tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    hf_cfg = HFConfig(vocab_size=len(hf_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = randomize(UMT5EncoderModel(hf_cfg)).eval()
    model.save_pretrained(root / "text_encoder")
    config, params, tok = load_text_encoder(root)
    return types.SimpleNamespace(root=root, hf_tok=hf_tok, model=model, config=config, params=params, tok=tok)


def torch_encode(model, ids, mask):
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy()


def wan_reference(pipe, prompts, max_length):
    """diffusers' own `WanPipeline._get_t5_prompt_embeds` on the transformers tokenizer and encoder."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    fake = types.SimpleNamespace(tokenizer=pipe.hf_tok, text_encoder=pipe.model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        out = WanPipeline._get_t5_prompt_embeds(fake, prompt=prompts, max_sequence_length=max_length,
                                                device=torch.device("cpu"), dtype=torch.float32)
    return out.numpy()


# -- config ------------------------------------------------------------------------------------------------
def test_config_from_transformers(pipe):
    raw = json.loads((pipe.root / "text_encoder" / "config.json").read_text())
    cfg = UMT5Config.from_transformers(raw)
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (32, 8, 64, 2, 4)
    assert cfg.vocab_size == len(pipe.hf_tok)
    with pytest.raises(ValueError, match="mystery_width"):
        UMT5Config.from_transformers({**raw, "mystery_width": 3})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        UMT5Config.from_transformers({**raw, "feed_forward_proj": "relu"})
    # Bookkeeping keys of real umt5-xxl configs are ignored.
    assert UMT5Config.from_transformers({**raw, "scalable_attention": True, "output_past": True}) == cfg
    assert HFConfig(**{k: v for k, v in cfg.to_transformers().items() if k != "architectures"}).d_ff == 64


def test_relative_position_buckets_match_transformers(pipe):
    attn = pipe.model.encoder.block[0].layer[0].SelfAttention
    for length, buckets, distance in [(600, 32, 128), (40, 8, 16)]:
        attn.relative_attention_num_buckets, attn.relative_attention_max_distance = buckets, distance
        pos = torch.arange(length)
        ref = attn._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), ref)
    attn.relative_attention_num_buckets, attn.relative_attention_max_distance = 32, 128


# -- encoder parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_umt5_encode_parity(pipe, impl):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, pipe.config.vocab_size, (5, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 1:] = 0
    mask[3, [3, 17, 30]] = 0  # holes, not just right padding
    mask[4] = 0  # nothing to attend to: uniform attention (the dtype's min, not -inf), no NaN
    pipe.model.set_attn_implementation(impl)
    try:
        ref = torch_encode(pipe.model, ids, mask)
    finally:
        pipe.model.set_attn_implementation("sdpa")
    ours = np.asarray(umt5_encode(pipe.config, pipe.params, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == (5, 40, 32) and np.isfinite(ref).all()
    assert rel_err(ours, ref) <= TOL  # all positions, padded ones included
    assert rel_err(ours[1, 25:], ref[1, 25:]) <= TOL


def test_encode_prompts_matches_wan_pipeline(pipe):
    for max_length, prompts in [(16, PROMPTS), (512, PROMPTS[:4])]:
        ours, lengths = encode_prompts(pipe.config, pipe.params, pipe.tok, prompts, max_length, return_lengths=True)
        ours = np.asarray(ours)
        ref = wan_reference(pipe, prompts, max_length)
        assert ours.shape == ref.shape == (len(prompts), max_length, 32)
        assert rel_err(ours, ref) <= TOL
        mask = pipe.hf_tok([text_io.prompt_clean(p) for p in prompts], padding="max_length",
                           max_length=max_length, truncation=True, return_tensors="np")["attention_mask"]
        np.testing.assert_array_equal(lengths, mask.sum(1))
        for row, n in zip(ours, lengths):
            assert np.all(row[n:] == 0) and np.all(np.abs(row[:n]).max(-1) > 0)
        assert lengths[0] == 1 and lengths[3] == max_length  # "" is just </s>; the long prompt is truncated


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = PROMPTS + ["a\x1cb\x1d c", "&amp;lt;b&amp;gt; &quot;q&quot;", "\u3000lead\u2003and\u00a0trail\u2029"]
    texts += ["x\x85y\u180ez", "\x1f edge \x1c"]  # where `re` and `regex` disagree on \s
    assert [text_io.prompt_clean(t) for t in texts] == [prompt_clean(t) for t in texts]


def test_compiles_once_per_shape(pipe):
    fn = text_io._encode_zero_padded
    before = fn._cache_size()
    encode_prompts(pipe.config, pipe.params, pipe.tok, ["a cat", "a dog"], 24)
    encode_prompts(pipe.config, pipe.params, pipe.tok, ["一只猫", PROMPTS[3]], 24)
    assert fn._cache_size() == before + 1
    # Any number of prompts in fixed-size chunks: one more compile, for (3, 24).
    many = [f"prompt number {i}" for i in range(7)]
    chunked, lengths = encode_prompts(pipe.config, pipe.params, pipe.tok, many, 24, batch_size=3, return_lengths=True)
    assert fn._cache_size() == before + 2 and chunked.shape == (7, 24, 32) and lengths.shape == (7,)
    whole = encode_prompts(pipe.config, pipe.params, pipe.tok, many, 24)
    assert rel_err(chunked, whole) <= TOL


# -- tokenizer ---------------------------------------------------------------------------------------------
def _backend_json(tok) -> dict:
    d = json.loads(tok.to_str())
    return {k: d[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "added_tokens", "model")}


def assert_same_tokenizer(directory, prompts):
    hf, ours = AutoTokenizer.from_pretrained(directory), Tokenizer.from_directory(directory)
    assert _backend_json(ours.backend) == _backend_json(hf.backend_tokenizer)
    assert len(ours) == len(hf)
    for max_length in (16, 512):
        want = hf(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_attention_mask=True, return_tensors="np")
        ids, mask = ours(prompts, max_length)
        assert ids.dtype == mask.dtype == np.int32
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
    return ours


def test_tokenizer_matches_transformers(pipe):
    tok = assert_same_tokenizer(pipe.root / "tokenizer", PROMPTS)
    ids, mask = tok(PROMPTS, 16)
    assert ids[0, 0] == 1 and mask[0].sum() == 1  # "" -> [</s>]
    assert ids[3, 15] == 1 and mask[3].all()  # truncated, still ends with </s>
    assert tok("one prompt", 8)[0].shape == (1, 8)


def test_tiny_tokenizer_is_deterministic_and_t5_like(tmp_path, pipe):
    train_tiny_tokenizer(tmp_path / "again")
    again, first = tmp_path / "again" / "tokenizer.json", pipe.root / "tokenizer" / "tokenizer.json"
    assert again.read_bytes() == first.read_bytes()
    vocab = pipe.tok.backend.get_vocab()
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)
    assert len(pipe.tok) == 384
    pipe.tok.save(tmp_path / "saved")
    assert_same_tokenizer(tmp_path / "saved", PROMPTS[:3])


def test_tokenizer_umt5_style_files(tmp_path, pipe):
    """A tokenizer.json laid out like converted umt5 files (Precompiled NFKC charsmap + Replace normalizer, Metaspace
    pre-tokenizer, sentinels not in the vocab): transformers 5 rebuilds it as T5Tokenizer; so must we."""
    spm = pytest.importorskip("sentencepiece")
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    import base64
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c"] * 10), model_writer=buf, vocab_size=8,
                                   normalization_rule_name="nmt_nfkc", minloglevel=3, hard_vocab_limit=False)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    charsmap = base64.b64encode(proto.normalizer_spec.precompiled_charsmap).decode()
    tok_json = json.loads((pipe.root / "tokenizer" / "tokenizer.json").read_text())
    tok_json["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": charsmap},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    tok_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    d = tmp_path / "umt5_like"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(tok_json))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5TokenizerFast", "eos_token": "</s>"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "unk_token": "<unk>"}))
    tok = assert_same_tokenizer(d, PROMPTS + ["<extra_id_0> ｆｕｌｌ ① ﬁ sentinel", "<extra_id_99>x"])
    assert len(tok) == 384 + 100  # T5's 100 sentinels appended


# -- loading, saving, dtypes -------------------------------------------------------------------------------
def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    sd = safetensors.torch.load_file(dst / "model.safetensors")
    edit(sd)
    safetensors.torch.save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_load_errors_name_the_key(tmp_path, pipe):
    src = pipe.root / "text_encoder"
    bad = _rewrite(src, tmp_path / "missing", lambda sd: sd.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        load_text_encoder(bad, subfolder=None, tokenizer_subfolder=None)
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    bad = _rewrite(src, tmp_path / "shape", lambda sd: sd.__setitem__(key, sd[key][:, :16].contiguous()))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \[32, 16\], expected \[32, 32\]"):
        load_text_encoder(bad, subfolder=None, tokenizer_subfolder=None)
    extra = "decoder.final_layer_norm.weight"
    bad = _rewrite(src, tmp_path / "extra", lambda sd: sd.__setitem__(extra, sd["shared.weight"][0].clone()))
    with pytest.raises(ValueError, match=r"unexpected tensors.*decoder\.final_layer_norm\.weight"):
        load_text_encoder(bad, subfolder=None, tokenizer_subfolder=None)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path)


def test_untied_embeddings_use_the_encoders_own(tmp_path, pipe):
    """Files with both `shared.weight` and a different `encoder.embed_tokens.weight`: transformers unties them and
    the encoder embeds with its own; so do we. A file with only the encoder's copy loads too."""
    def both(sd):
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"] * 2

    d = _rewrite(pipe.root / "text_encoder", tmp_path / "both", both)
    config, params, _ = load_text_encoder(d, subfolder=None, tokenizer_subfolder=None)
    ids, mask = pipe.tok(PROMPTS[:3], 16)
    ref = torch_encode(UMT5EncoderModel.from_pretrained(d).eval(), ids, mask)
    assert rel_err(umt5_encode(config, params, jnp.asarray(ids), jnp.asarray(mask)), ref) <= TOL
    only = _rewrite(d, tmp_path / "only", lambda sd: sd.pop("shared.weight"))
    _, params2, _ = load_text_encoder(only, subfolder=None, tokenizer_subfolder=None)
    np.testing.assert_array_equal(params2["embed_tokens"], params["embed_tokens"])


def test_save_round_trip_through_transformers(tmp_path, pipe):
    params = init_text_encoder_params(pipe.config, jax.random.key(3))
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape), params)
    files = save_text_encoder(pipe.config, params, tmp_path / "text_encoder", max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files  # sharded
    model = UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids, mask = pipe.tok(PROMPTS, 16)
    ours = np.asarray(umt5_encode(pipe.config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_err(ours, torch_encode(model, ids, mask)) <= TOL
    config, loaded, _ = load_text_encoder(tmp_path, tokenizer_subfolder=None)
    assert config == pipe.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    # And the transformers-saved tiny pipeline's own params survive our save -> transformers load.
    save_text_encoder(pipe.config, pipe.params, tmp_path / "again")
    again = UMT5EncoderModel.from_pretrained(tmp_path / "again").eval()
    for (k, a), (_, b) in zip(sorted(again.state_dict().items()), sorted(pipe.model.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_bf16_params(tmp_path, pipe):
    config, params, tok = load_text_encoder(pipe.root, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    emb16 = encode_prompts(config, params, tok, PROMPTS, 16)
    emb32 = encode_prompts(pipe.config, pipe.params, pipe.tok, PROMPTS, 16)
    assert emb16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(emb16, np.float32)).all()
    assert rel_err(np.asarray(emb16, np.float32), emb32) <= 3e-2  # transformers' own bf16 is 1.7e-2 off here
    assert np.array_equal(np.asarray(emb16, np.float32) == 0, np.asarray(emb32) == 0)
    save_text_encoder(config, params, tmp_path / "bf16")  # stored dtype kept
    stored = stio.SafetensorsFile(tmp_path / "bf16" / "model.safetensors")
    assert {stored.tensors[k].dtype for k in stored.keys()} == {np.dtype(jnp.bfloat16)}
    model = UMT5EncoderModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    ids, mask = tok(PROMPTS, 16)
    ours = umt5_encode(config, params, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32)
    assert rel_err(ours, torch_encode(model.float(), ids, mask)) <= 3e-2
