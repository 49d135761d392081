"""Every loading route, round trips, key maps against diffusers' own converter, bad input, atomic writes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

import reference as ref
import wanjax
from wanjax import safetensors_io as stio
from wanjax import transformer_io, weights

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def forward(config, params, inp):
    kw = {k: jnp.asarray(v) for k, v in inp.items()}
    out = wanjax.transformer_forward(
        config, params, kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
        encoder_hidden_states_image=kw.get("encoder_hidden_states_image"),
    )
    return np.asarray(out)


def check_route(path, model, cfg, inp_kw=None, **load_kw):
    inp = ref.inputs(cfg, **(inp_kw or {}))
    config, params = wanjax.load_transformer(path, dtype=jnp.float32, **load_kw)
    assert ref.rel_err(forward(config, params, inp), ref.torch_forward(model, inp)) <= TOL
    return config, params


def original_state_dict(model, prefix="model.diffusion_model."):
    return {prefix + weights.diffusers_to_original_key(k): v.contiguous() for k, v in model.state_dict().items()}


# -- routes ------------------------------------------------------------------------------------------------
def test_route_diffusers_folder_sharded(tmp_path):
    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    check_route(tmp_path, model, ref.T2V)


@pytest.mark.parametrize("subfolder,expert", [(None, None), ("transformer", None), ("transformer_2", None),
                                               (None, "transformer_2"), ("transformer", "transformer_2")])
def test_route_pipeline_folder_two_experts(tmp_path, subfolder, expert):
    """`expert` (a -low flavour's transformer_2) is read when the path is a pipeline and no subfolder is given."""
    high, low = ref.make_model(ref.T2V, seed=1), ref.make_model(ref.T2V, seed=2)
    high.save_pretrained(tmp_path / "transformer")
    low.save_pretrained(tmp_path / "transformer_2")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                    "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875})
    )
    expected = low if (subfolder or expert) == "transformer_2" else high
    check_route(tmp_path, expected, ref.T2V, subfolder=subfolder, **({"expert": expert} if expert else {}))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_route_original_single_file(tmp_path, prefix):
    """Original-Wan / ComfyUI names; config inferred from shapes (heads = D / 128)."""
    cfg = dict(ref.FLF2V, attention_head_dim=128, added_kv_proj_dim=256, rope_max_seq_len=1024)
    model = ref.make_model(cfg)
    path = tmp_path / "wan.safetensors"
    safetensors.torch.save_file(original_state_dict(model, prefix), path)
    config, _ = check_route(path, model, cfg, {"text_len": 512})
    assert config == wanjax.WanConfig.from_diffusers(dict(model.config))


def test_route_single_file_heads_override(tmp_path):
    model = ref.make_model(ref.T2V)  # head_dim 12: not inferable, so the caller says it
    path = tmp_path / "wan.safetensors"
    safetensors.torch.save_file(original_state_dict(model), path)
    with pytest.raises(ValueError, match="num_attention_heads"):
        wanjax.load_transformer(path)
    check_route(path, model, ref.T2V, num_attention_heads=2, attention_head_dim=12, rope_max_seq_len=32)


def test_route_comfyui_file_with_diffusers_names(tmp_path):
    cfg = dict(ref.T2V, attention_head_dim=128)
    model = ref.make_model(cfg)
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(sd, tmp_path / "wan.safetensors")
    check_route(tmp_path / "wan.safetensors", model, cfg, rope_max_seq_len=32)


def test_route_wanjax_checkpoint(tmp_path):
    model = ref.make_model(ref.I2V_ADDED_KV)
    model.save_pretrained(tmp_path / "hf")
    reader = transformer_io.open_reader(tmp_path / "hf")
    transformer_io.write_wanjax(reader, tmp_path / "wj", max_shard_bytes=30_000)
    assert (tmp_path / "wj" / "params.safetensors.index.json").exists()
    check_route(tmp_path / "wj", model, ref.I2V_ADDED_KV, {"text_len": 512})


def test_route_hub_repo_id(tmp_path, monkeypatch):
    """A repo id goes to huggingface_hub for the transformer files only (download itself mocked: no network)."""
    import huggingface_hub as hf

    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path / "snap" / "transformer")
    (tmp_path / "snap" / "model_index.json").write_text("{}")
    calls = []

    def fake_file(repo_id, filename, **kw):
        calls.append(("file", repo_id, filename))
        return str(tmp_path / "snap" / filename)

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snap")

    monkeypatch.setattr(hf, "hf_hub_download", fake_file)
    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot)
    check_route("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", model, ref.T2V)
    assert calls[0] == ("file", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model_index.json")
    assert calls[1][0] == "snapshot" and all(p.startswith(("transformer/", "model_index")) for p in calls[1][2])


def test_mesh_sharded_load_matches(tmp_path):
    """Loading straight into shardings over 8 devices gives the same model, actually sharded."""
    import jax

    from wanjax.sharding import make_mesh

    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path)
    mesh = make_mesh(data=1, fsdp=4, context=1, tensor=2)
    config, params = check_route(tmp_path, model, ref.T2V, mesh=mesh)
    q = params["blocks"]["attn1"]["to_q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 6, 12)


# -- key maps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [ref.T2V, ref.FLF2V], ids=["t2v", "flf2v"])
def test_original_names_agree_with_diffusers_converter(cfg):
    model = ref.make_model(cfg)
    sd = model.state_dict()
    converted = convert_wan_transformer_to_diffusers(original_state_dict(model))
    # diffusers' single-file converter leaves FLF2V's `img_emb.emb_pos` unrenamed (its own gap); we map it.
    if "img_emb.emb_pos" in converted:
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    assert set(converted) == set(sd)
    for k, v in converted.items():
        assert torch.equal(v, sd[k]), k
    for k in sd:
        assert weights.original_to_diffusers_key(weights.diffusers_to_original_key(k)) == k


def test_wanjax_paths_cover_diffusers_keys_both_ways():
    model = ref.make_model(ref.FLF2V)
    shapes = wanjax.param_shapes(wanjax.WanConfig.from_diffusers(dict(model.config)))
    expected = weights.expected_diffusers_shapes(shapes, ref.FLF2V["num_layers"])
    assert expected == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in expected:
        m = weights.diffusers_to_wanjax(k)
        assert weights.wanjax_to_diffusers(m.path, m.layer) == k


# -- round trips -------------------------------------------------------------------------------------------
def _tensors(folder):
    store = transformer_io._open_store(Path(folder), "diffusion_pytorch_model")
    return {k: store.read(k) for k in store.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical(tmp_path, dtype):
    model = ref.make_model(ref.FLF2V).to(dtype)
    model.save_pretrained(tmp_path / "a", max_shard_size="50KB")
    transformer_io.write_wanjax(transformer_io.open_reader(tmp_path / "a"), tmp_path / "wj")
    transformer_io.write_diffusers(transformer_io.open_reader(tmp_path / "wj"), tmp_path / "b", max_shard_bytes=40_000)
    config, params = wanjax.load_transformer(tmp_path / "wj", dtype=None)
    wanjax.save_transformer(config, params, tmp_path / "c")
    a = _tensors(tmp_path / "a")
    for other in ("b", "c"):
        b = _tensors(tmp_path / other)
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].tobytes() == b[k].tobytes(), k
    # and diffusers itself loads what we wrote, with the same config
    again = WanTransformer3DModel.from_pretrained(tmp_path / "c")
    assert wanjax.WanConfig.from_diffusers(dict(again.config)) == wanjax.WanConfig.from_diffusers(dict(model.config))
    for k, v in again.state_dict().items():
        assert torch.equal(v.to(dtype), model.state_dict()[k]), k


def test_save_transformer_from_random_params_loads_in_diffusers(tmp_path):
    import jax

    config = wanjax.WanConfig.from_diffusers(ref.T2V)
    params = wanjax.init_params(config, jax.random.key(0))
    wanjax.save_transformer(config, params, tmp_path / "m")
    model = WanTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    inp = ref.inputs(ref.T2V)
    assert ref.rel_err(forward(config, params, inp), ref.torch_forward(model, inp)) <= TOL


def test_random_params_take_the_dtypes_loading_gives(tmp_path):
    """init_params / param_shapes in bfloat16 hold what load_transformer(dtype=bfloat16) holds: bfloat16, except
    diffusers' float32 modules (time embedder, norms with affine weights, scale-shift tables)."""
    import jax
    import jax.numpy as jnp

    config = wanjax.WanConfig.from_diffusers(ref.T2V)
    wanjax.save_transformer(config, wanjax.init_params(config, jax.random.key(0)), tmp_path / "m")
    _, loaded = wanjax.load_transformer(tmp_path / "m", dtype=jnp.bfloat16)

    def dtypes(tree):
        return {jax.tree_util.keystr(p): jnp.dtype(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    want = dtypes(loaded)
    assert set(want.values()) == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert dtypes(wanjax.init_params(config, jax.random.key(1), jnp.bfloat16)) == want
    assert dtypes(wanjax.param_shapes(config, jnp.bfloat16)) == want
    assert set(dtypes(wanjax.param_shapes(config)).values()) == {jnp.dtype(jnp.float32)}


def test_safetensors_writer_readable_by_reference_library(tmp_path):
    import ml_dtypes

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.full((4,), 1.5, ml_dtypes.bfloat16)}
    stio.write_safetensors(tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in arrays.items()],
                           arrays.__getitem__, {"k": "v"})
    loaded = safetensors.torch.load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert loaded["b"].dtype == torch.bfloat16 and torch.all(loaded["b"] == 1.5)
    f = stio.SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"k": "v"} and np.array_equal(f.read("a", slice(1, 2)), arrays["a"][1:2])


# -- bad input ---------------------------------------------------------------------------------------------
def _folder_with(tmp_path, mutate):
    model = ref.make_model(ref.T2V)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    mutate(sd)
    d = tmp_path / "bad"
    d.mkdir()
    safetensors.torch.save_file(sd, d / "diffusion_pytorch_model.safetensors")
    (d / "config.json").write_text(json.dumps(dict(model.config)))
    return d


def test_missing_key_named_with_expected_shape(tmp_path):
    d = _folder_with(tmp_path, lambda sd: sd.pop("blocks.1.attn2.to_k.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*blocks\.1\.attn2\.to_k\.weight \[24, 24\]"):
        wanjax.load_transformer(d)


def test_extra_key_named(tmp_path):
    d = _folder_with(tmp_path, lambda sd: sd.__setitem__("blocks.0.attn1.lora_A.weight", torch.zeros(2, 24)))
    with pytest.raises(ValueError, match=r"unexpected tensors.*blocks\.0\.attn1\.lora_A\.weight"):
        wanjax.load_transformer(d)


def test_shape_mismatch_named(tmp_path):
    d = _folder_with(tmp_path, lambda sd: sd.__setitem__("blocks.0.ffn.net.2.weight", torch.zeros(24, 31)))
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn\.net\.2\.weight' has shape \[24, 31\], expected \[24, 32\]"):
        wanjax.load_transformer(d)


def test_not_a_wan_file(tmp_path):
    safetensors.torch.save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a Wan transformer"):
        wanjax.load_transformer(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        wanjax.load_transformer(tmp_path / "junk.safetensors")


def test_truncated_shard_detected(tmp_path):
    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        wanjax.load_transformer(tmp_path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path / "src")
    reader = transformer_io.open_reader(tmp_path / "src")
    calls = {"n": 0}
    real = reader.read

    def failing(path, layers=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return real(path, layers)

    monkeypatch.setattr(reader, "read", failing)
    with pytest.raises(OSError):
        transformer_io.write_wanjax(reader, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


# -- the converter scripts -----------------------------------------------------------------------------
def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "convert" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_scripts_round_trip_and_errors(tmp_path):
    ref.make_model(ref.T2V).save_pretrained(tmp_path / "fp32")
    # as diffusers ships bf16 models: half precision with its float32 modules kept in float32
    WanTransformer3DModel.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    r = _run("diffusers_to_wanjax.py", "--src", tmp_path / "hf", "--dst", tmp_path / "wj", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    config, params = wanjax.load_transformer(tmp_path / "wj", dtype=None)
    assert params["blocks"]["ffn"]["proj_in"]["kernel"].dtype == jnp.float32
    r = _run("wanjax_to_diffusers.py", "--src", tmp_path / "wj", "--dst", tmp_path / "back", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert a["blocks.0.scale_shift_table"].dtype == np.float32 and a["blocks.0.attn1.to_q.weight"].dtype != np.float32
    for k in a:  # bf16 -> f32 -> bf16 is exact, and the float32 modules stay float32
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    r = _run("wanjax_to_diffusers.py", "--src", tmp_path / "wj", "--dst", tmp_path / "back")
    assert r.returncode == 1 and "exists" in r.stderr
    safetensors.torch.save_file({"x.weight": torch.zeros(1)}, tmp_path / "notwan.safetensors")
    r = _run("diffusers_to_wanjax.py", "--src", tmp_path / "notwan.safetensors", "--dst", tmp_path / "o")
    assert r.returncode == 1 and "not a Wan transformer" in r.stderr and "patch_embedding.weight" in r.stderr
    assert not (tmp_path / "o").exists()


def test_two_process_sharded_load_and_save(tmp_path):
    """Params sharded across 2 processes (2 CPU devices each): every process joins the gathers, process 0 writes
    a folder identical to the source."""
    import os
    import socket

    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path / "src")
    script = (
        "import sys, wanjax\n"
        "from wanjax.sharding import make_mesh, maybe_initialize_distributed\n"
        "maybe_initialize_distributed()\n"
        "mesh = make_mesh(fsdp=4)\n"
        "config, params = wanjax.load_transformer(sys.argv[1], dtype=None, mesh=mesh)\n"
        "assert not params['blocks']['attn1']['to_q']['kernel'].is_fully_addressable\n"
        "wanjax.save_transformer(config, params, sys.argv[2])\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-2000:] for o in outs)
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


# -- --dst that is a file, stale partial folders, a missing local --src that looks like a repo id -------------
def _one_line_error(r):
    """The converter failed with exit status 1 and one `error: ...` line, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln and not ln.startswith("I0000")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def test_dst_that_is_a_file_is_refused_in_one_line(tmp_path):
    ref.make_model(ref.T2V).save_pretrained(tmp_path / "hf")
    (tmp_path / "out.bin").write_text("a file, not a folder")
    reader = transformer_io.open_reader(tmp_path / "hf")
    for write in (transformer_io.write_wanjax, transformer_io.write_diffusers):
        with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'out.bin'}: exists and is not a folder")):
            write(reader, tmp_path / "out.bin", overwrite=True)
    for args in ((), ("--overwrite",)):
        r = _run("diffusers_to_wanjax.py", "--src", tmp_path / "hf", "--dst", tmp_path / "out.bin", *args)
        line = _one_line_error(r)
        assert f"{tmp_path / 'out.bin'}: exists and is not a folder" in line and "must be a folder" in line
    assert (tmp_path / "out.bin").read_text() == "a file, not a folder"
    # an OSError the OS raises (a --dst below a file) is one line too, naming the path
    line = _one_line_error(_run("diffusers_to_wanjax.py", "--src", tmp_path / "hf", "--dst", tmp_path / "out.bin" / "x"))
    assert str(tmp_path / "out.bin") in line


def test_stale_partial_folders_of_killed_writers_are_removed(tmp_path, caplog):
    """A killed conversion leaves `.{name}.partial-<pid>`; the next write to the same --dst removes those whose process
    is gone (and logs it), keeps those of a running process and of other destinations."""
    import os

    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path / "src")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".dst.partial-{dead.pid}"
    alive = tmp_path / f".dst.partial-{os.getppid()}"  # pytest's parent: running
    other = tmp_path / f".other.partial-{dead.pid}"
    for d in (stale, alive, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "params-00001.safetensors").write_bytes(b"half written")
    with caplog.at_level("WARNING", logger="wanjax.transformer_io"):
        transformer_io.write_wanjax(transformer_io.open_reader(tmp_path / "src"), tmp_path / "dst")
    assert not stale.exists() and alive.exists() and other.exists()
    assert f"removing {stale}" in caplog.text and str(alive) not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "dst", alive.name, other.name])
    check_route(tmp_path / "dst", model, ref.T2V)


def test_writer_killed_while_swapping_leaves_nothing_lost(tmp_path, caplog):
    """Killed between moving the old output aside (`.{name}.old-<pid>`) and moving the new one in: the next write puts
    the old output back when --dst is missing (it is only replaced by a finished write), and removes a leftover old
    copy when --dst exists."""
    model = ref.make_model(ref.T2V)
    model.save_pretrained(tmp_path / "src")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reader = transformer_io.open_reader(tmp_path / "src")
    transformer_io.write_wanjax(reader, tmp_path / "dst")
    swapped = tmp_path / f".dst.old-{dead.pid}"
    (tmp_path / "dst").rename(swapped)
    with caplog.at_level("WARNING", logger="wanjax.transformer_io"):
        transformer_io.write_wanjax(reader, tmp_path / "dst", overwrite=True)
    assert f"restoring {tmp_path / 'dst'} from {swapped}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    check_route(tmp_path / "dst", model, ref.T2V)

    (swapped / "sub").mkdir(parents=True)  # dst exists: a leftover old copy is removed
    caplog.clear()
    with caplog.at_level("WARNING", logger="wanjax.transformer_io"):
        transformer_io.write_wanjax(reader, tmp_path / "dst", overwrite=True)
    assert f"removing {swapped}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_missing_local_path_that_looks_like_a_repo_id(tmp_path, monkeypatch):
    """`output/my-ckpt` that does not exist is tried as a hub repo id (the call is real, the hub is not reached here);
    when that fails too, the error says both: no such local path, and why the hub lookup failed."""
    import huggingface_hub as hf
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(repo_id, *a, **kw):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("outgoing traffic has been disabled (HF_HUB_OFFLINE=1)")

    monkeypatch.setattr(hf, "hf_hub_download", offline)
    monkeypatch.setattr(hf, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        transformer_io.open_reader("output/my-ckpt")
    assert calls and set(calls) == {"output/my-ckpt"}
    msg = str(e.value)
    assert msg.startswith("output/my-ckpt: no such local file or directory") and "hub repo id 'output/my-ckpt'" in msg
    assert "LocalEntryNotFoundError: outgoing traffic has been disabled (HF_HUB_OFFLINE=1)" in msg
    monkeypatch.undo()
    # the converter, with the real huggingface_hub offline (HF_HUB_OFFLINE=1: no network): one line, both reasons
    line = _one_line_error(_run("diffusers_to_wanjax.py", "--src", "output/my-ckpt", "--dst", tmp_path / "o"))
    assert "output/my-ckpt: no such local file or directory" in line and "hub repo id" in line and "Error" in line
