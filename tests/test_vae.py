"""Wan VAE against diffusers' AutoencoderKLWan (tiny Wan2.1 and Wan2.2 configs, every parameter randomised):
encode / decode parity (whole clip, chunked, tiled), save / load routes, errors, compile-once."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

from wanjax.models.vae import Tiling, VaeConfig, vae_decode, vae_encode
from wanjax.vae_io import diffusers_shapes, init_vae_params, load_vae, save_vae

TOL = 1e-4  # max|ours - ref| <= TOL * max|ref|, float32

_g = torch.Generator().manual_seed(7)
CONFIGS = {
    # diffusers' own test config for the Wan2.1 VAE
    "wan21": {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
              "temperal_downsample": [False, True, True]},
    # Wan2.2 layout with widths that change across blocks, so AvgDown3D / DupUp3D regroup channels
    "wan22": {"base_dim": 2, "decoder_base_dim": 3, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
              "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
              "patch_size": 2, "scale_factor_spatial": 16,
              "latents_mean": (0.3 * torch.randn(48, generator=_g)).tolist(),
              "latents_std": (0.5 + torch.rand(48, generator=_g)).tolist()},
}  # fmt: skip
SIZES = {"wan21": (16, 24), "wan22": (32, 48)}  # non-square, one latent size (2, 3) for both
# Tiling: (video H, W) and (latent h, w) cut into a row of tiles of 2 shapes (each shape is a compile), except
# the Wan2.1 latents: a 2-D grid, where tiles blend with already blended neighbours as in diffusers.
TILED = {"wan21": ((16, 48), (4, 6), Tiling(24, 24, 16, 16)), "wan22": ((32, 96), (1, 6), Tiling(32, 32, 16, 16))}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: gammas around 1, biases around 0, weights ~ N(0, 1 / fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))


def make_model(kind: str, seed: int = 0) -> AutoencoderKLWan:
    model = AutoencoderKLWan(**CONFIGS[kind])
    randomize(model, seed)
    return model.eval()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def stats(model, dtype=torch.float32):
    mean = torch.tensor(model.config.latents_mean, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


def reference(model, video, z):
    """Pipelines' use of the VAE: normalised mode on encode, un-normalise then decode (clamped)."""
    mean, std = stats(model)
    with torch.no_grad():
        enc = (model.encode(torch.from_numpy(video)).latent_dist.mode() - mean) / std
        dec = model.decode(torch.from_numpy(z) * std + mean).sample
    return enc.numpy(), dec.numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    kind = request.param
    model = make_model(kind)
    folder = tmp_path_factory.mktemp(kind) / "vae"
    model.save_pretrained(folder)
    config, params = load_vae(folder)
    rng = np.random.default_rng(0)
    h, w = SIZES[kind]
    s = config.spatial_factor
    video = rng.uniform(-1, 1, (2, 3, 13, h, w)).astype(np.float32)  # 13 = 1 + 4 * 3 frames: 4 latent frames
    z = rng.standard_normal((2, config.z_dim, 4, h // s, w // s)).astype(np.float32)
    enc, dec = reference(model, video, z)
    return {"kind": kind, "model": model, "folder": folder, "config": config, "params": params, "video": video, "z": z,
            "enc": enc, "dec": dec}  # fmt: skip


# -- parity ------------------------------------------------------------------------------------------------
def test_parameters_randomised(case):
    for name, p in case["model"].named_parameters():
        assert not torch.all(p == 1) and not torch.all(p == 0), name


@pytest.mark.parametrize("chunk", [1, None])
def test_encode_parity(case, chunk):
    ours = vae_encode(case["config"], case["params"], jnp.asarray(case["video"]), chunk=chunk)
    assert ours.dtype == jnp.float32 and ours.shape == case["enc"].shape
    assert rel_err(ours, case["enc"]) <= TOL


@pytest.mark.parametrize("chunk", [1, None])
def test_decode_parity(case, chunk):
    ours = vae_decode(case["config"], case["params"], jnp.asarray(case["z"]), chunk=chunk)
    assert ours.shape == case["dec"].shape == (2, 3, 13, *SIZES[case["kind"]])
    assert rel_err(ours, case["dec"]) <= TOL


def test_float64_exact(case, monkeypatch):
    """In float64 the whole-clip formulation is diffusers' streaming to rounding (float32 parity above only
    shows it to float32 noise). diffusers' WanUpsample rounds its input to float32 (a no-op in float32)."""
    monkeypatch.setattr(WanUpsample, "forward", lambda self, x: torch.nn.Upsample.forward(self, x))
    model = copy.deepcopy(case["model"]).double()
    mean, std = stats(model, torch.float64)
    video, z = case["video"].astype(np.float64), case["z"].astype(np.float64)
    with torch.no_grad():
        enc = ((model.encode(torch.from_numpy(video)).latent_dist.mode() - mean) / std).numpy()
        dec = model.decode(torch.from_numpy(z) * std + mean).sample.numpy()
    with jax.enable_x64(True):
        config, params = load_vae(case["folder"], dtype=jnp.float64)
        ours_enc = vae_encode(config, params, jnp.asarray(video), chunk=None)
        ours_dec = vae_decode(config, params, jnp.asarray(z), chunk=None)
    assert ours_enc.dtype == ours_dec.dtype == jnp.float64
    assert rel_err(ours_enc, enc) <= 1e-12 and rel_err(ours_dec, dec) <= 1e-12


def test_causal_prefix_and_short_last_chunk(case):
    """A clip's first frames encode / decode to the reference's first latents / frames (causality), here with
    chunks longer than the clip: the first frame, then one shorter chunk (the tail path)."""
    config, params = case["config"], case["params"]
    enc = vae_encode(config, params, jnp.asarray(case["video"][:, :, :9]), chunk=3)
    assert rel_err(enc, case["enc"][:, :, :3]) <= TOL
    dec = vae_decode(config, params, jnp.asarray(case["z"][:, :, :2]), chunk=3)
    assert rel_err(dec, case["dec"][:, :, :5]) <= TOL


def test_tiled_parity(case):
    """Against diffusers' enable_tiling() with tiles smaller than the clip (see TILED)."""
    model, config, params = case["model"], case["config"], case["params"]
    (h, w), (lh, lw), tiling = TILED[case["kind"]]
    rng = np.random.default_rng(1)
    video = rng.uniform(-1, 1, (1, 3, 5, h, w)).astype(np.float32)
    z = rng.standard_normal((1, config.z_dim, 2, lh, lw)).astype(np.float32)
    plain_enc, plain_dec = reference(model, video, z)
    model.enable_tiling(**dataclasses.asdict(tiling))
    try:
        enc, dec = reference(model, video, z)
    finally:
        model.disable_tiling()
    assert rel_err(plain_enc, enc) > 1e-3 and rel_err(plain_dec, dec) > 1e-3  # tiling really changes the result
    # Whole clip per tile (chunking is tested above and composes with tiling): one compile per tile shape.
    assert rel_err(vae_encode(config, params, jnp.asarray(video), tiling=tiling, chunk=None), enc) <= TOL
    assert rel_err(vae_decode(config, params, jnp.asarray(z), tiling=tiling, chunk=None), dec) <= TOL


def test_bfloat16(tmp_path):
    """bf16 params and activations (norms in float32) are as accurate as diffusers' own bf16 model. Wider than
    the parity configs: a WanRMS_norm over 1-2 channels is a sign function, chaotic in any half precision."""
    kind = "wan22"  # every block type; the bf16-specific code (norms, casts, accumulation) is shared with 2.1
    model = AutoencoderKLWan(**{**CONFIGS[kind], "base_dim": 8, "decoder_base_dim": 8})
    randomize(model, 3)
    model.save_pretrained(tmp_path)
    config, params = load_vae(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    rng = np.random.default_rng(3)
    video = rng.uniform(-1, 1, (1, 3, 5, *SIZES[kind])).astype(np.float32)
    z = rng.standard_normal((1, config.z_dim, 2, 2, 3)).astype(np.float32)
    enc, dec = reference(model.eval(), video, z)
    half = AutoencoderKLWan.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    mean, std = stats(model)
    with torch.no_grad():
        enc16 = (half.encode(torch.from_numpy(video).bfloat16()).latent_dist.mode().float() - mean) / std
        dec16 = half.decode((torch.from_numpy(z) * std + mean).bfloat16()).sample.float()
    ours_enc = vae_encode(config, params, jnp.asarray(video), chunk=None)
    ours_dec = vae_decode(config, params, jnp.asarray(z), chunk=None)
    assert ours_enc.dtype == ours_dec.dtype == jnp.float32
    assert rel_err(ours_enc, enc) <= max(2 * rel_err(enc16, enc), 1e-2)
    assert rel_err(ours_dec, dec) <= max(2 * rel_err(dec16, dec), 1e-2)


def test_compile_once():
    """Traced once per input shape: new values, new params and an equal config built anew reuse the trace."""
    config = VaeConfig.from_diffusers(CONFIGS["wan21"])
    traces = []

    @jax.jit
    def roundtrip(config, params, video):
        traces.append(video.shape)
        return vae_decode(config, params, vae_encode(config, params, video), chunk=None)

    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.uniform(-1, 1, (1, 3, 5, 8, 8)).astype(np.float32)) for _ in range(2))
    out_a = roundtrip(config, init_vae_params(config, jax.random.key(0)), a)
    same = VaeConfig.from_diffusers(json.loads(json.dumps(config.to_diffusers())))
    out_b = roundtrip(same, init_vae_params(same, jax.random.key(1)), b)
    assert not np.allclose(out_a, out_b)
    assert len(traces) == 1


# -- config and weights I/O --------------------------------------------------------------------------------
def test_config_and_key_map(case):
    model, config = case["model"], case["config"]
    assert config.to_diffusers() == {
        "_class_name": "AutoencoderKLWan",
        **{k: v for k, v in model.config.items() if not k.startswith("_")},
    }
    assert {k: s for k, (_, s) in diffusers_shapes(config).items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan config keys.*'base_dimm'"):
        VaeConfig.from_diffusers({"base_dimm": 3})
    assert VaeConfig.from_diffusers({**config.to_diffusers(), "clip_output": False}) == config  # legacy key
    with pytest.raises(ValueError, match="latents_mean"):
        VaeConfig.from_diffusers({**config.to_diffusers(), "latents_mean": [0.0] * 3})


def test_save_roundtrip(case, tmp_path):
    """save_vae -> diffusers from_pretrained -> the same weights and outputs; load_vae gives the params back."""
    save_vae(case["config"], case["params"], tmp_path / "out")
    reloaded = AutoencoderKLWan.from_pretrained(tmp_path / "out").eval()
    for k, v in case["model"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    enc, dec = reference(reloaded, case["video"], case["z"])
    np.testing.assert_array_equal(enc, case["enc"])
    np.testing.assert_array_equal(dec, case["dec"])
    config, params = load_vae(tmp_path / "out")
    assert config == case["config"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, case["params"])
    with pytest.raises(FileExistsError):
        save_vae(case["config"], case["params"], tmp_path / "out")


def test_load_pipeline_and_sharded(case, tmp_path):
    case["model"].save_pretrained(tmp_path / "vae", max_shard_size="20KB")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").exists()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]})
    )
    config, params = load_vae(tmp_path)
    assert config == case["config"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, case["params"])


def test_init_params_load_in_diffusers(tmp_path):
    config = VaeConfig.from_diffusers(CONFIGS["wan22"])
    params = init_vae_params(config, jax.random.key(0))
    save_vae(config, params, tmp_path / "init")
    model = AutoencoderKLWan.from_pretrained(tmp_path / "init")
    kernel = params["decoder"]["up_blocks_2_upsampler"]["resample_1"]["kernel"]
    np.testing.assert_array_equal(model.state_dict()["decoder.up_blocks.2.upsampler.resample.1.weight"].numpy(),
                                  np.asarray(kernel).transpose(3, 2, 0, 1))  # fmt: skip


# -- errors ------------------------------------------------------------------------------------------------
def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_load_errors(case, tmp_path):
    case["model"].save_pretrained(tmp_path / "a")
    _edit_weights(tmp_path / "a", lambda sd: sd.pop("decoder.conv_out.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \[decoder\.conv_out\.bias \[\d+\]\]"):
        load_vae(tmp_path / "a")
    case["model"].save_pretrained(tmp_path / "b")
    _edit_weights(tmp_path / "b", lambda sd: sd.update({"encoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \[encoder\.extra\.weight\]"):
        load_vae(tmp_path / "b")
    case["model"].save_pretrained(tmp_path / "c")
    _edit_weights(tmp_path / "c", lambda sd: sd.update({"encoder.conv_in.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match=r"'encoder\.conv_in\.bias' has shape \[5\], expected"):
        load_vae(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a Wan VAE folder"):
        load_vae(tmp_path / "nowhere")


def test_shape_errors(case):
    config, params = case["config"], case["params"]
    h, w = SIZES[case["kind"]]
    s = config.spatial_factor
    bad = {
        "frames": (1, 3, 8, h, w),
        "height": (1, 3, 9, h + s // 2, w),
        "channels": (1, 4, 9, h, w),
        "rank": (3, 9, h, w),
    }
    for shape in bad.values():
        with pytest.raises(
            ValueError, match=rf"video shape \({', '.join(map(str, shape))},?\): expected \(B, 3, 4k\+1, H, W\).*{s}"
        ):
            vae_encode(config, params, jnp.zeros(shape))
    with pytest.raises(ValueError, match=rf"latents shape .*expected \(B, {config.z_dim}, T, h, w\)"):
        vae_decode(config, params, jnp.zeros((1, config.z_dim + 1, 2, 2, 2)))
    with pytest.raises(ValueError, match="multiples of the spatial factor"):
        vae_decode(config, params, jnp.asarray(case["z"]), tiling=Tiling(12, 12, 8, 8))


REAL = {  # the released VAEs' architectures (Wan2.1: diffusers' defaults; Wan2.2 TI2V-5B)
    "wan21": ({}, 126.9e6),
    "wan22": ({"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
               "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "latents_mean": [0.0] * 48,
               "latents_std": [1.0] * 48}, 704.7e6),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(REAL))
def test_real_architectures_key_map(kind):
    """Names and shapes of the released VAEs equal diffusers' (built on the meta device: no memory)."""
    kwargs, n_params = REAL[kind]
    with torch.device("meta"):
        model = AutoencoderKLWan(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: s for k, (_, s) in diffusers_shapes(VaeConfig.from_diffusers(dict(model.config))).items()}
    assert ours == expected
    assert abs(sum(int(np.prod(s)) for s in ours.values()) - n_params) < 0.05e6
