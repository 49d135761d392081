"""LoRA: parity with diffusers / PEFT adapters (forward and gradients), every file format both ways, exact
invariants (B = 0, merged == unmerged, zero-padding, missing layers), and clear errors on bad input."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import reference as ref
import wanjax
from wanjax import lora as wl
from wanjax import weights
from wanjax.models.config import WanConfig
from wanjax.safetensors_io import SafetensorsFile

TOL = 1e-4  # max |wanjax - diffusers| <= TOL * max |diffusers|
CFG = ref.T2V
PEFT_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
    "proj_out", "time_proj", "text_embedder.linear_2",
]  # fmt: skip
ATTN_FFN = wl.DEFAULT_TARGETS + ("ffn.net.0.proj", "ffn.net.2")
# PEFT flags lora_B.bias (1-D by design) as a possibly unsharded tensor when diffusers saves it
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*have invalid shape:UserWarning")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(config, float32 params, inputs, base output) of the tiny T2V model every diffusers copy is built from."""
    d = tmp_path_factory.mktemp("base")
    ref.make_model(CFG).save_pretrained(d)
    config, params = wanjax.load_transformer(d, dtype=jnp.float32)
    inp = ref.inputs(CFG)
    return config, params, inp, run(config, params, inp)


@jax.jit
def _forward(config, params, inp, lora):
    return wanjax.transformer_forward(
        config, params, inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], lora=lora
    )


def run(config, params, inp, lora=None):
    return np.asarray(_forward(config, params, {k: jnp.asarray(v) for k, v in inp.items()}, lora))


def pipeline():
    """A WanPipeline around a fresh copy of the base model: only the transformer is needed to load LoRAs."""
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=ref.make_model(CFG),
    )


def diffusers_output(path, inp):
    pipe = pipeline()
    pipe.load_lora_weights(str(path))
    return ref.torch_forward(pipe.transformer, inp)


def random_lora(config, seed=0, **kw) -> wl.LoraWeights:
    """init_lora, then B and bias random too, so every adapter changes the output."""
    lora = wl.init_lora(config, jax.random.key(seed), **kw)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [x if p[-1].key == "A" else 0.3 * jax.random.normal(k, x.shape) for k, (p, x) in zip(keys, leaves)]
    return lora.replace(params=jax.tree_util.tree_unflatten(treedef, new))


def peft_model(seed=0, **lora_kw):
    """The base diffusers model with a PEFT adapter whose every LoRA tensor (B included) is random."""
    model = ref.make_model(CFG)
    model.add_adapter(LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def save_peft(model, directory):
    WanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )


def _get(params, module):
    """The {"A", "B", ...} leaf of a LoRA params tree for a canonical module name."""
    path = weights.diffusers_to_wanjax((module if wl._is_top(module) else f"blocks.0.{module}") + ".weight").path
    for k in path[:-1]:
        params = params[k]
    return params


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers, both directions
# ---------------------------------------------------------------------------------------------------------
def test_diffusers_written_lora_matches_diffusers(base, tmp_path):
    config, params, inp, base_out = base
    # per-module rank and alpha through PEFT's rank_pattern / alpha_pattern: padded and folded into B
    model = peft_model(
        r=4, lora_alpha=6, target_modules=PEFT_TARGETS, lora_bias=True,
        rank_pattern={"ffn.net.0.proj": 2}, alpha_pattern={"attn1.to_q": 12},
    )  # fmt: skip
    expected = ref.torch_forward(model, inp)
    save_peft(model, tmp_path)
    lora = wl.load_lora(tmp_path, config=config)
    assert (lora.rank, lora.alpha) == (4, 6.0)
    assert not np.any(_get(lora.params, "ffn.net.0.proj")["B"][:, 2:])
    assert set(lora.targets) == set(wl.parse_targets(PEFT_TARGETS))
    assert ref.rel_err(base_out, expected) > 100 * TOL  # the adapter matters
    assert ref.rel_err(run(config, params, inp, lora), expected) <= TOL
    # PEFT's own layout: adapter_model.safetensors (base_model.model. keys) beside adapter_config.json
    sd = load_file(tmp_path / wl.DIFFUSERS_FILE)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({"base_model.model." + k.removeprefix("transformer."): v for k, v in sd.items()},
              peft_dir / "adapter_model.safetensors")  # fmt: skip
    config_json = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config["default"].to_dict().items()}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config_json))
    assert ref.rel_err(run(config, params, inp, wl.load_lora(peft_dir, config=config)), expected) <= TOL
    # without the metadata diffusers assumes alpha = r; so must we
    save_file(sd, tmp_path / "bare.safetensors", metadata={"format": "pt"})
    bare = wl.load_lora(tmp_path / "bare.safetensors", config=config)
    assert bare.alpha == bare.rank == 4
    assert ref.rel_err(run(config, params, inp, bare), diffusers_output(tmp_path / "bare.safetensors", inp)) <= TOL


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_saved_lora_loads_in_diffusers(base, tmp_path, fmt, bias):
    config, params, inp, base_out = base
    lora = random_lora(config, rank=4, alpha=6, targets=PEFT_TARGETS, bias=bias)
    ours = run(config, params, inp, lora)
    path = tmp_path / "lora.safetensors"
    wl.save_lora(lora, path, format=fmt)
    expected = diffusers_output(path, inp)
    assert ref.rel_err(base_out, expected) > 100 * TOL
    assert ref.rel_err(ours, expected) <= TOL
    back = wl.load_lora(path, config=config)  # and back into wanjax
    assert (back.rank, back.alpha, back.targets) == (lora.rank, lora.alpha, lora.targets)
    for (p, got), want in zip(jax.tree_util.tree_leaves_with_path(back.params), jax.tree_util.tree_leaves(lora.params)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(p))


def test_saved_metadata_is_what_diffusers_reads(base, tmp_path):
    config = base[0]
    wl.save_lora(random_lora(config, rank=2, alpha=3, targets="to_q,proj_out", bias=True), tmp_path)
    f = SafetensorsFile(tmp_path / wl.DIFFUSERS_FILE)
    assert f.metadata["format"] == "pt"
    assert json.loads(f.metadata["lora_adapter_metadata"]) == {
        "transformer.r": 2, "transformer.lora_alpha": 3, "transformer.lora_bias": True,
        "transformer.target_modules": ["attn1.to_q", "attn2.to_q", "proj_out"],
    }  # fmt: skip
    assert f.tensors["transformer.blocks.1.attn2.to_q.lora_A.weight"].shape == (2, 24)
    assert f.tensors["transformer.proj_out.lora_B.weight"].shape == (16, 2)


# ---------------------------------------------------------------------------------------------------------
# Exact invariants
# ---------------------------------------------------------------------------------------------------------
def test_zero_B_is_the_base_model_bitwise(base):
    config, params, inp, base_out = base
    every = [m for m in wl._all_modules() if "add_" not in m and "image_embedder" not in m]
    lora = wl.init_lora(config, jax.random.key(3), rank=4, alpha=8, targets=every, bias=True)
    assert all(np.all(np.abs(leaf["A"]).max(axis=(-2, -1)) > 0) for _, leaf in wl._adapters(lora.params))
    np.testing.assert_array_equal(run(config, params, inp, lora), base_out)


def test_merged_equals_unmerged(base):
    config, params, inp, _ = base
    lora = random_lora(config, rank=4, alpha=6, targets=PEFT_TARGETS + ["linear_1"], bias=True)
    before = jax.tree_util.tree_map(np.array, params)
    merged = wl.merge_lora(params, lora)
    assert ref.rel_err(run(config, merged, inp), run(config, params, inp, lora)) <= 1e-5
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # pure
    half = wl.merge_lora(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), lora)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_init_and_shapes(base):
    config = base[0]
    lora = wl.init_lora(config, jax.random.key(0), rank=8, targets="to_q,ffn.net.2")
    assert lora.alpha == 8.0 and lora.targets == ("attn1.to_q", "attn2.to_q", "ffn.net.2")
    a, b = lora.params["blocks"]["ffn"]["proj_out"]["A"], lora.params["blocks"]["ffn"]["proj_out"]["B"]
    assert a.shape == (2, 32, 8) and b.shape == (2, 8, 24) and not np.any(b)
    bound = 1 / np.sqrt(32)  # PEFT's kaiming_uniform(a=sqrt(5)) on (r, in)
    assert 0.8 * bound < np.abs(a).max() <= bound
    shapes = wl.lora_shapes(config, 8, lora.targets)
    assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes) == jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), lora.params
    )
    assert set(wl.parse_targets("to_q, to_k,to_v,to_out.0")) == set(wl.DEFAULT_TARGETS)
    assert wl.parse_targets(["proj_out"]) == ("proj_out",)  # the head only, not the FFN's ffn.net.2


# ---------------------------------------------------------------------------------------------------------
# Other formats, per-module alpha / rank, missing layers
# ---------------------------------------------------------------------------------------------------------
def _comfy_to_musubi(key: str) -> str:
    stem = key.removeprefix("diffusion_model.")
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if stem.endswith(suffix):
            return "lora_unet_" + stem[: -len(suffix)].replace(".", "_") + suffix
    raise AssertionError(key)


def test_musubi_file_with_per_module_alpha_and_rank(base, tmp_path):
    config, params, inp, _ = base
    lora = random_lora(config, rank=4, alpha=4, targets=ATTN_FFN)  # every module diffusers' musubi reader needs
    wl.save_lora(lora, tmp_path / "c.safetensors", format="comfyui")
    sd = {_comfy_to_musubi(k): v for k, v in load_file(tmp_path / "c.safetensors").items()}
    sd["lora_unet_blocks_1_self_attn_q.alpha"] = torch.tensor(2.0)
    sd["lora_unet_blocks_0_ffn_0.alpha"] = torch.tensor(12.0)
    sd["lora_unet_blocks_0_cross_attn_v.lora_down.weight"] = sd["lora_unet_blocks_0_cross_attn_v.lora_down.weight"][:2]
    sd["lora_unet_blocks_0_cross_attn_v.lora_up.weight"] = sd["lora_unet_blocks_0_cross_attn_v.lora_up.weight"][:, :2]
    path = tmp_path / "musubi.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)

    expected = diffusers_output(path, inp)
    loaded = wl.load_lora(path, config=config)
    assert (loaded.rank, loaded.alpha) == (4, 4.0)
    assert not np.any(_get(loaded.params, "attn2.to_v")["B"][0][2:])  # rank 2 zero-padded to 4
    assert ref.rel_err(run(config, params, inp, lora), expected) > 100 * TOL  # the edits matter
    assert ref.rel_err(run(config, params, inp, loaded), expected) <= TOL


def test_missing_layers_get_zero_adapters(base, tmp_path):
    config, params, inp, _ = base
    lora = random_lora(config, rank=4, alpha=6, targets=wl.DEFAULT_TARGETS)
    wl.save_lora(lora, tmp_path / "c.safetensors", format="comfyui")
    full = load_file(tmp_path / "c.safetensors")
    dropped = ("diffusion_model.blocks.1.self_attn.", "diffusion_model.blocks.0.cross_attn.o.")
    save_file({k: v for k, v in full.items() if not k.startswith(dropped)}, tmp_path / "partial.safetensors")
    loaded = wl.load_lora(tmp_path / "partial.safetensors", config=config)
    assert not np.any(_get(loaded.params, "attn2.to_out.0")["A"][0])
    assert not np.any(_get(loaded.params, "attn1.to_q")["B"][1])
    assert np.any(_get(loaded.params, "attn1.to_q")["B"][0])
    expected = diffusers_output(tmp_path / "partial.safetensors", inp)
    assert ref.rel_err(run(config, params, inp, loaded), expected) <= TOL

    # a whole block missing: the config gives the depth; without one the file does, and check_compatible objects
    save_file({k: v for k, v in full.items() if ".blocks.1." not in k}, tmp_path / "one_block.safetensors")
    padded = wl.load_lora(tmp_path / "one_block.safetensors", config=config)
    assert _get(padded.params, "attn1.to_q")["A"].shape == (2, 24, 4)
    assert not np.any(_get(padded.params, "attn1.to_q")["A"][1])
    shallow = wl.load_lora(tmp_path / "one_block.safetensors")
    assert _get(shallow.params, "attn1.to_q")["A"].shape == (1, 24, 4)
    with pytest.raises(ValueError, match=re.escape("(1, 24, 4), this model expects (2, 24, 4)")):
        wl.check_compatible(shallow, config)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_lora_for_another_width_or_depth_is_refused(base, tmp_path):
    config = base[0]
    wide = WanConfig(**dict(CFG, attention_head_dim=24))  # width 48: "a 14B LoRA on the 1.3B"
    wl.save_lora(wl.init_lora(wide, jax.random.key(0), rank=4), tmp_path / "wide.safetensors")
    msg = (
        r"wide\.safetensors: transformer\.blocks\.\d\.attn1\.to_k\.lora_A\.weight: "
        r"LoRA A has shape \(2, 48, 4\), this model expects \(2, 24, 4\)"
    )
    with pytest.raises(ValueError, match=msg):
        wl.load_lora(tmp_path / "wide.safetensors", config=config)
    with pytest.raises(ValueError, match=re.escape("(2, 48, 4), this model expects (2, 24, 4)")):
        wl.check_compatible(wl.load_lora(tmp_path / "wide.safetensors"), config)

    deep = WanConfig(**dict(CFG, num_layers=3))
    wl.save_lora(wl.init_lora(deep, jax.random.key(0), rank=4), tmp_path / "deep.safetensors", format="comfyui")
    msg = r"blocks\.2\.self_attn\.\w+\.lora_down\.weight: block 2 is out of range for a 2-layer"
    with pytest.raises(ValueError, match=msg):
        wl.load_lora(tmp_path / "deep.safetensors", config=config)


def test_i2v_lora_on_t2v_model_is_refused(base, tmp_path):
    config = base[0]
    i2v = WanConfig(**ref.I2V_ADDED_KV)
    i2v_lora = wl.init_lora(i2v, jax.random.key(0), rank=4, targets="add_k_proj")
    wl.save_lora(i2v_lora, tmp_path / "i2v.safetensors", format="comfyui")
    with pytest.raises(ValueError, match=r"cross_attn\.k_img\.lora_down\.weight: this model has no such layer"):
        wl.load_lora(tmp_path / "i2v.safetensors", config=config)
    with pytest.raises(ValueError, match=r"'attn2\.add_k_proj' is not a layer of this model"):
        wl.init_lora(config, jax.random.key(0), rank=4, targets="add_k_proj")
    with pytest.raises(ValueError, match=r"unknown LoRA target 'to_x'; valid module names: .*attn1\.to_q"):
        wl.parse_targets("to_q,to_x")


def test_non_lora_files_are_refused(tmp_path):
    ref.make_model(CFG).save_pretrained(tmp_path / "model")
    weights_file = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match=re.escape(str(weights_file)) + ": not a LoRA file"):
        wl.load_lora(weights_file)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        wl.load_lora(junk)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("diffusion_model.blocks.0.self_attn.q.diff", (24, 24)),  # full-weight difference
        ("diffusion_model.patch_embedding.lora_down.weight", (4, 4, 1, 2, 2)),  # conv LoRA
        ("diffusion_model.blocks.0.norm3.lora_down.weight", (4, 24)),  # not a linear
    ],
)
def test_unsupported_keys_are_named(tmp_path, key, shape):
    good = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 24),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(24, 4),
    }
    save_file({**good, key: torch.zeros(shape)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"bad.safetensors: unsupported LoRA key {key!r}")):
        wl.load_lora(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------------------
# Training: gradients through the unmerged path
# ---------------------------------------------------------------------------------------------------------
def test_gradients_match_peft(base, tmp_path):
    config, params, inp, _ = base
    model = peft_model(seed=7, r=4, lora_alpha=6, target_modules=PEFT_TARGETS, lora_bias=True)
    save_peft(model, tmp_path)
    lora = wl.load_lora(tmp_path, config=config)
    cot = np.random.default_rng(5).standard_normal(base[3].shape).astype(np.float32)

    kw = {k: torch.from_numpy(v) for k, v in inp.items()}
    (model(**kw, return_dict=False)[0] * torch.from_numpy(cot)).sum().backward()
    expected = {n: p.grad.numpy() for n, p in model.named_parameters() if ".lora_" in n}

    jin = {k: jnp.asarray(v) for k, v in inp.items()}
    grads = jax.jit(jax.grad(lambda w: jnp.sum(_forward(config, params, jin, w) * cot)))(lora).params
    for name, g_ref in expected.items():  # blocks.0.attn1.to_q.lora_A.default.weight
        module, _, tensor = name.partition(".lora_")
        km = weights.diffusers_to_wanjax(module + ".weight")
        leaf = grads
        for k in km.path[:-1]:
            leaf = leaf[k]
        which = {"A.default.weight": "A", "B.default.weight": "B", "B.default.bias": "bias"}[tensor]
        g = np.asarray(leaf[which] if km.layer is None else leaf[which][km.layer])
        assert ref.rel_err(g.T if which != "bias" else g, g_ref) <= TOL, name
    assert len(expected) == sum(3 * (1 if wl._is_top(m) else 2) for m in lora.targets)


# ---------------------------------------------------------------------------------------------------------
# Exporting training checkpoints (convert/export_lora.py), --dst / path semantics, norm diffs on import
# ---------------------------------------------------------------------------------------------------------
_ROOT = Path(__file__).resolve().parents[1]


def _sharded_checkpoint(config, run_dir):
    """A training-like checkpoint written by wanjax.checkpoint.Checkpointer: the LoRA and its EMA fsdp-sharded over
    every test device (8). Returns (checkpoint step folder, host LoRA, host EMA)."""
    import grain

    from wanjax.checkpoint import Checkpointer
    from wanjax.sharding import fsdp_shardings, make_mesh

    lora, ema = random_lora(config, seed=3, rank=4, alpha=6), random_lora(config, seed=4, rank=4, alpha=6)
    mesh = make_mesh(fsdp=-1)
    shardings = fsdp_shardings(lora.params, mesh)
    put = lambda t: jax.tree_util.tree_map(jax.device_put, t, shardings)  # noqa: E731
    state = {"lora": put(lora.params), "ema": put(ema.params), "step": jnp.asarray(5, jnp.int32)}
    a = state["lora"]["blocks"]["attn1"]["to_q"]["A"]
    assert len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
    meta = {"lora": {"rank": 4, "alpha": 6.0, "targets": list(lora.targets)}, "method": "lora"}
    ckptr = Checkpointer(run_dir, max_to_keep=None)
    ckptr.save(5, state, iter(grain.MapDataset.range(4).to_iter_dataset()), meta)
    ckptr.wait()
    ckptr.close()
    host = lambda w: w.replace(params=jax.tree_util.tree_map(np.asarray, w.params))  # noqa: E731
    return run_dir / "checkpoints" / "5", host(lora), host(ema)


def _same_tensors(a, b):
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert SafetensorsFile(a).metadata == SafetensorsFile(b).metadata


def test_export_lora_from_8_device_checkpoint_on_1_device(base, tmp_path):
    """A run trained on 8 devices exports on a 1-device host (restoring without a target failed: Topology mismatch),
    tensor for tensor what save_lora writes from the saved values."""
    ckpt, lora, ema = _sharded_checkpoint(base[0], tmp_path / "run")
    wl.save_lora(lora, tmp_path / "expected_lora.safetensors")
    wl.save_lora(ema, tmp_path / "expected_ema.safetensors", format="comfyui")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    for src, weights_, fmt, expected in ((ckpt, "lora", "diffusers", "expected_lora"),
                                         (tmp_path / "run", "auto", "comfyui", "expected_ema")):
        dst = tmp_path / f"{weights_}.safetensors"
        r = subprocess.run([sys.executable, str(_ROOT / "convert" / "export_lora.py"), "--src", str(src), "--dst",
                            str(dst), "--weights", weights_, "--format", fmt],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        _same_tensors(dst, tmp_path / f"{expected}.safetensors")


def _load_export_lora():
    spec = importlib.util.spec_from_file_location("export_lora", _ROOT / "convert" / "export_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_lora_reads_the_metadata_file_by_name(base, tmp_path, monkeypatch):
    """The meta folder holds orbax's commit_success.txt too; whatever order the filesystem lists it in (tmpfs lists
    commit_success.txt first), the JSON metadata is read. --dst ending in "/" is a folder, created."""
    ckpt, lora, _ = _sharded_checkpoint(base[0], tmp_path / "run")
    meta = ckpt / "meta"
    assert {p.name for p in meta.iterdir()} == {"commit_success.txt", "metadata"}
    real_glob, real_iterdir = Path.glob, Path.iterdir

    def hostile(entries):  # commit_success.txt first, as tmpfs lists it
        return iter(sorted(entries, key=lambda p: p.name != "commit_success.txt"))

    monkeypatch.setattr(Path, "glob", lambda self, pat, **kw: hostile(real_glob(self, pat, **kw)) if self.name == "meta"
                        else real_glob(self, pat, **kw))
    monkeypatch.setattr(Path, "iterdir", lambda self: hostile(real_iterdir(self)) if self.name == "meta"
                        else real_iterdir(self))
    export_lora = _load_export_lora()
    export_lora.main(["--src", str(ckpt), "--dst", str(tmp_path / "out") + "/", "--weights", "lora"])
    monkeypatch.undo()
    wl.save_lora(lora, tmp_path / "expected.safetensors")
    _same_tensors(tmp_path / "out" / wl.DIFFUSERS_FILE, tmp_path / "expected.safetensors")
    (meta / "metadata").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{meta / 'metadata'}: not found; expected")):
        export_lora.read_meta(ckpt)


def test_save_lora_path_is_a_folder_unless_it_ends_in_safetensors(base, tmp_path):
    """As diffusers' save_lora_weights(save_directory): a path without the .safetensors suffix (or ending in "/") is a
    folder, created, holding pytorch_lora_weights.safetensors, which load_lora_weights(folder) finds; a path ending
    in .safetensors is the file itself."""
    config, params, inp, _ = base
    lora = random_lora(config, rank=2, alpha=3)
    for given, written in (("newdir", "newdir/" + wl.DIFFUSERS_FILE),
                           ("a/b/", "a/b/" + wl.DIFFUSERS_FILE),
                           ("x/model.v2", "x/model.v2/" + wl.DIFFUSERS_FILE),
                           ("c/d/my_lora.safetensors", "c/d/my_lora.safetensors")):
        returned = wl.save_lora(lora, str(tmp_path / given) + ("/" if given.endswith("/") else ""))
        assert (tmp_path / written).is_file(), given
        assert returned == tmp_path / written
    assert sorted(p.name for p in (tmp_path / "newdir").iterdir()) == [wl.DIFFUSERS_FILE]
    ref_out = diffusers_output(tmp_path / "newdir", inp)  # diffusers reads the folder
    assert ref.rel_err(run(config, params, inp, lora), ref_out) <= TOL
    assert ref.rel_err(run(config, params, inp, wl.load_lora(tmp_path / "newdir", config=config)), ref_out) <= TOL
    (tmp_path / "plainfile").write_text("not a folder")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'plainfile'}: exists and is not a folder")):
        wl.save_lora(lora, tmp_path / "plainfile")


def _with_norm_diffs(config, tmp_path, value):
    lora = random_lora(config, rank=4, alpha=4)
    wl.save_lora(lora, tmp_path / "c.safetensors", format="comfyui")
    sd = load_file(tmp_path / "c.safetensors")
    for i in range(config.num_layers):
        sd[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.full((config.inner_dim,), value)
        sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(config.inner_dim)
        sd[f"diffusion_model.blocks.{i}.self_attn.norm_q.diff"] = torch.zeros(config.inner_dim)
    save_file(sd, tmp_path / "norm_diff.safetensors")
    return lora, tmp_path / "norm_diff.safetensors"


def test_all_zero_norm_diffs_are_dropped_with_a_warning(base, tmp_path, caplog):
    """Published ComfyUI / musubi LoRAs (LightX2V, CausVid) carry all-zero norm .diff / .diff_b keys; diffusers drops
    them and loads the file, so wanjax does too (exactly: they are no-ops), saying how many it dropped."""
    config, params, inp, _ = base
    lora, path = _with_norm_diffs(config, tmp_path, 0.0)
    with caplog.at_level("WARNING", logger="wanjax.lora"):
        loaded = wl.load_lora(path, config=config)
    assert re.search(r"norm_diff\.safetensors: dropped 6 all-zero norm \.diff/\.diff_b tensors", caplog.text)
    expected = diffusers_output(path, inp)
    assert ref.rel_err(run(config, params, inp, loaded), expected) <= TOL
    assert ref.rel_err(run(config, params, inp, lora), expected) <= TOL


def test_nonzero_norm_diffs_are_refused(base, tmp_path):
    """A non-zero .diff is a full-weight difference, not a low-rank adapter: refused, naming the key and its size."""
    _, path = _with_norm_diffs(base[0], tmp_path, 0.5)
    key = "diffusion_model.blocks.0.norm3.diff"
    with pytest.raises(ValueError, match=re.escape(f"{path}: unsupported LoRA key {key!r}") + r".*max \|value\| 0\.5"):
        wl.load_lora(path, config=base[0])
