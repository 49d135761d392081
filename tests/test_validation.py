"""Validation settings (wanjax/validation.py): sizes checked against the pipeline's own VAE (Wan2.2's 16x VAE
needs multiples of 32), prompt-library nicknames as file names (any script, length-capped, collisions made
unique), and settings that would only fail at the first validation round refused up front."""

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from wanjax import validation as V
from wanjax.data import records
from wanjax.models import vae
from wanjax.tiny import TINY_TRANSFORMER, TINY_VAE

ROOT = Path(__file__).resolve().parents[1]
# the Wan2.2-style tiny VAE of the audit's make22.py: z48, 2x2 patchify, 16x spatial
TINY_VAE22 = dict(base_dim=8, z_dim=48, dim_mult=(1, 1, 1, 1), num_res_blocks=1, temperal_downsample=(False, True, True),
                  is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                  latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48)
TEXT_LEN, TEXT_DIM = 16, TINY_TRANSFORMER.text_dim


def _sha6(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]


def config(tmp_path=None, library=None, **overrides):
    """configs/lora.py:tiny with validation on (one prompt, 48x32x5), as a user's run config."""
    spec = importlib.util.spec_from_file_location("cfg_lora", ROOT / "configs" / "lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.validation_step_interval, c.validation_prompt = 2, "a red square drifting right"
    c.validation_resolution, c.validation_num_video_frames, c.ema_validation = "48x32", 5, "none"
    if library is not None:
        path = tmp_path / "lib.json"
        path.write_text(library if isinstance(library, str) else json.dumps(library, ensure_ascii=False),
                        encoding="utf-8")
        c.validation_prompt_library = str(path)
    for k, v in overrides.items():
        c[k] = v
    return c


def pipeline(tmp_path, vae_kwargs, *, weights=True):
    """A pipeline folder as far as the Validator reads it: model_index.json, vae/ (config only, or with random
    weights), no text encoder (prompts come from the cache)."""
    root = tmp_path / "pipeline"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    cfg = vae.VaeConfig(**vae_kwargs)
    if weights:
        from wanjax import vae_io

        vae_io.save_vae(cfg, vae.init_vae_params(cfg, jax.random.key(1)), root / "vae")
    else:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    return root


def prompt_cache(tmp_path, texts):
    """A cache folder holding embeddings of `texts` (as the caching job writes validation_prompts.safetensors)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    rng = np.random.default_rng(0)
    names = {f"p{i}": t for i, t in enumerate(texts)}
    records.write_text_embeds(cache / records.VALIDATION_PROMPTS_FILE,
                              {k: rng.standard_normal((3, TEXT_DIM)).astype(np.float32) for k in names},
                              metadata={"prompts": json.dumps(names, ensure_ascii=False)})
    return cache


class NoiseMethod:
    """A stand-in method: `sample` checks the latents fit the transformer's patch and returns the noise."""

    def __init__(self, patch=(1, 2, 2)):
        self.patch, self.shapes = patch, []

    def sample(self, state, ema, noise, cond, uncond, key, validator):
        f, h, w = noise.shape[2:]
        assert not (f % self.patch[0] or h % self.patch[1] or w % self.patch[2]), noise.shape
        self.shapes.append(tuple(noise.shape))
        return noise


def validator(tmp_path, settings, vae_kwargs, model=TINY_TRANSFORMER):
    texts = [t for _, t in settings.prompts] + [settings.negative_prompt]
    return V.Validator(settings, output_dir=tmp_path / "out", pipeline=str(pipeline(tmp_path, vae_kwargs)),
                       cache_dir=prompt_cache(tmp_path, texts), text_len=TEXT_LEN, model_config=model)


def _frames(path):
    import av

    with av.open(str(path)) as f:
        return np.stack([x.to_ndarray(format="rgb24") for x in f.decode(video=0)])


# -- 1. sizes against the pipeline's VAE ------------------------------------------------------------------------
def test_validation_size_multiple_follows_the_vae():
    """48x32 passes the parse-time check (16) and Wan2.1's 8x VAE, but not Wan2.2's 16x one: the latent would be
    2x3, which the 2x2 patch cannot tile (the audit's run crashed there at its first validation)."""
    s = V.settings_from_config(config(validation_resolution="48x32"))
    V.check_video_size(s, vae.VaeConfig(**TINY_VAE), TINY_TRANSFORMER.patch_size)  # 8x: 16 | 48, 32
    with pytest.raises(V.ValidationConfigError, match=r"validation_resolution 48x32: width and height must be "
                                                      r"multiples of 32 for this pipeline \(2 x the VAE's 16x spatial "
                                                      r"downsampling\); e.g\. 64x32"):
        V.check_video_size(s, vae.VaeConfig(**TINY_VAE22), TINY_TRANSFORMER.patch_size)
    for ok in ("64x32", "832x480", "1280x704"):
        V.check_video_size(V.settings_from_config(config(validation_resolution=ok)), vae.VaeConfig(**TINY_VAE22))
    # a list is checked size by size; the message names the failing one
    s = V.settings_from_config(config(validation_resolution="64x64,1280x720"))
    with pytest.raises(V.ValidationConfigError, match=r"validation_resolution 1280x720: .* multiples of 32 .*"
                                                      r"e\.g\. 1280x704"):
        V.check_video_size(s, vae.VaeConfig(**TINY_VAE22))
    # a transformer with a 4x4 patch over the 8x VAE needs 32 too
    with pytest.raises(V.ValidationConfigError, match=r"multiples of 32 .*its 4x4 patch"):
        V.check_video_size(V.settings_from_config(config(validation_resolution="48x32")), vae.VaeConfig(**TINY_VAE),
                           (1, 4, 4))
    with pytest.raises(V.ValidationConfigError, match=r"validation_num_video_frames=5: 2 latent frames .* temporal "
                                                      r"patch 3"):
        V.check_video_size(V.settings_from_config(config(validation_resolution="64x64")), vae.VaeConfig(**TINY_VAE),
                           (3, 2, 2))


def test_validation_validator_refuses_wan22_size_before_encoding(tmp_path):
    """The Validator (built before the base model loads) reads the pipeline's VAE config first and refuses 48x32
    for the Wan2.2 VAE -- before any prompt encoding or VAE weight read (neither exists here)."""
    s = V.settings_from_config(config(validation_resolution="48x32"))
    root = pipeline(tmp_path, TINY_VAE22, weights=False)
    (tmp_path / "empty-cache").mkdir()
    with pytest.raises(V.ValidationConfigError, match=r"validation_resolution 48x32: .*multiples of 32"):
        V.Validator(s, output_dir=tmp_path / "out", pipeline=str(root), cache_dir=tmp_path / "empty-cache",
                    text_len=TEXT_LEN, model_config=TINY_TRANSFORMER.replace(in_channels=48, out_channels=48))


def test_validation_wan22_renders_at_a_multiple_of_32(tmp_path):
    """64x32 with the Wan2.2-style VAE: the noise is (1, 48, 2, 2, 4), patch-divisible, and the decoded mp4 is
    64x32 with the requested 5 frames."""
    s = V.settings_from_config(config(validation_resolution="64x32"))
    v = validator(tmp_path, s, TINY_VAE22, model=TINY_TRANSFORMER.replace(in_channels=48, out_channels=48))
    method = NoiseMethod()
    (video,) = v.run(2, method, state=None)
    assert method.shapes == [(1, 48, 2, 2, 4)]
    assert video.path.name == "step_000002_validation.mp4" and _frames(video.path).shape == (5, 32, 64, 3)


# -- 2. nicknames as file names ---------------------------------------------------------------------------------
def test_validation_unicode_nicknames_keep_their_names(tmp_path):
    """{"猫": ..., "犬": ...} was refused as "nicknames ['validation', 'prompt', 'prompt'] collide" (every non-ASCII
    character became "_"); letters, digits and combining marks of any script are kept now, NFC-normalised."""
    lib = {"猫": "a cat", "犬": "a dog", "हिन्दी": "a word", "cafe\u0301 noir": "coffee", "Ñandú 2": "a bird"}
    s = V.settings_from_config(config(tmp_path, lib))
    assert [n for n, _ in s.prompts] == ["validation", "猫", "犬", "हिन्दी", "café_noir", "Ñandú_2"]
    assert [t for _, t in s.prompts][1:] == list(lib.values())


def test_validation_unsafe_characters_are_sanitised():
    """Path separators, control/format characters, Windows-reserved and shell-awkward characters become "_"
    (a run of them one "_"); ASCII names come out as before ("blue circle" -> "blue_circle")."""
    cases = {"blue circle": "blue_circle", "a/b": "a_b", "../../etc/passwd": ".._.._etc_passwd",
             "c:\\d*e?f\"g<h>i|j": "c_d_e_f_g_h_i_j", "tab\there\nnew": "tab_here_new", "\u202egnp.exe": "gnp.exe",
             "猫／犬": "猫_犬", "🐱 cat": "cat", "🐱": "prompt", "": "prompt", "___": "prompt", "a\ud800b": "a_b"}
    for nickname, want in cases.items():
        got = V.file_names([nickname])[0]
        assert got == want, (nickname, got)
        assert not any(c in got for c in '/\\:*?"<>|\x00') and got.isprintable()


def test_validation_long_nickname_is_cut_to_100_bytes(tmp_path):
    """A 300-character nickname was accepted and crashed at the final step (OSError: File name too long). The name
    is cut to <= 100 bytes of UTF-8 on a character boundary, and a round writes its video."""
    for nick, want in (("a" * 300, "a" * 100), ("猫" * 300, "猫" * 33), ("a" + "猫" * 300, "a" + "猫" * 33),
                       ("x" * 99 + "é", "x" * 99), ("x" * 99 + " tail", "x" * 99)):
        name = V.file_names([nick])[0]
        assert name == want and len(name.encode("utf-8")) <= V.NAME_MAX_BYTES, (nick[:5], name)
    lib = {"a" * 300: "a red square", "猫" * 300: "a cat"}
    s = V.settings_from_config(config(tmp_path, lib, validation_prompt=None, validation_resolution="48x32,32x48"))
    v = validator(tmp_path, s, TINY_VAE)
    videos = v.run(123456, NoiseMethod(), state=None)
    assert sorted(p.name for p in (tmp_path / "out" / "validation").glob("*.mp4")) == sorted(
        f"step_123456_{n}_{z}.mp4" for n in ("a" * 100, "猫" * 33) for z in ("48x32", "32x48"))
    assert all(_frames(x.path).shape[0] == 5 for x in videos)
    assert json.loads((tmp_path / "out" / "validation" / "videos.jsonl").read_text())["files"] == [
        x.path.name for x in videos]


def test_validation_collisions_get_a_stable_suffix(tmp_path):
    """Nicknames that make the same file name are no longer refused: the one `_safe_name` leaves unchanged (else
    the first) keeps it, the other gets "-" + sha1(nickname)[:6], whatever the library's order."""
    assert V.file_names(["a_b", "a b"]) == ["a_b", f"a_b-{_sha6('a b')}"]
    assert V.file_names(["a b", "a_b"]) == [f"a_b-{_sha6('a b')}", "a_b"]
    assert V.file_names(["a b", "a/b"]) == ["a_b", f"a_b-{_sha6('a/b')}"]
    # "validation" (validation_prompt's name) and a library entry of that name
    s = V.settings_from_config(config(tmp_path, {"validation": "another prompt"}))
    assert [n for n, _ in s.prompts] == ["validation", f"validation-{_sha6('validation')}"]
    # names equal but for case are one file on case-insensitive file systems (macOS, Windows)
    assert V.file_names(["Cat", "cat"]) == ["Cat", f"cat-{_sha6('cat')}"]
    # two long nicknames alike in their first 100 bytes: the suffix keeps the name within 100 bytes
    long_a, long_b = "a" * 150 + "1", "a" * 150 + "2"
    assert V.file_names([long_a, long_b]) == ["a" * 100, "a" * 93 + f"-{_sha6(long_b)}"]
    # the video suffixes count: "a"'s EMA video would be "a_ema" ("a_ema_48x32" with sizes), as "a_ema"'s is
    sizes = ((48, 32), (32, 48))
    for ema in ("comparison", "ema_only"):  # ema_only renders the trained weights when there is no EMA
        assert V.file_names(["a", "a_ema"], ema=ema) == ["a", f"a_ema-{_sha6('a_ema')}"]
        assert V.file_names(["a", "A_EMA"], ema=ema, sizes=sizes) == ["a", f"A_EMA-{_sha6('A_EMA')}"]
    assert V.file_names(["a", "a_ema"], ema="none", sizes=sizes) == ["a", "a_ema"]
    assert V.file_names(["a", "a_48x32"], sizes=sizes) == ["a", "a_48x32"]  # a_48x32_48x32 != a_48x32


def test_validation_ema_suffix_collision_writes_every_video(tmp_path):
    """{"a", "a_ema"} with ema_validation=comparison: "a"'s EMA video and "a_ema"'s trained one were both
    step_N_a_ema.mp4 (one overwrote the other, videos.jsonl listed it twice). Now every video has its own file."""

    class State:
        ema = object()

    s = V.settings_from_config(config(tmp_path, {"a": "x", "a_ema": "y"}, validation_prompt=None,
                                      ema_validation="comparison"))
    videos = validator(tmp_path, s, TINY_VAE).run(2, NoiseMethod(), State())
    names = [x.path.name for x in videos]
    assert len(names) == len(set(names)) == 4
    assert sorted(p.name for p in (tmp_path / "out" / "validation").glob("*.mp4")) == sorted(names)


def test_validation_unresolvable_collision_names_both_nicknames():
    """Only a library built to defeat the suffixes is refused, naming both nicknames."""
    nicks = ["x_y", f"x_y-{_sha6('x y')}", f"x_y-{_sha6('3:x y')}", "x y"]
    with pytest.raises(V.ValidationConfigError, match=r"nicknames 'x_y' and 'x y' make the same video file name "
                                                      r"'x_y' even with a suffix: rename one of them"):
        V.file_names(nicks)


# -- 3. other settings that used to fail only at a validation round -----------------------------------------------
def test_validation_library_problems_are_refused(tmp_path):
    """Duplicate nicknames (json.loads kept the last one: a prompt vanished), bad JSON, a list, no prompt text."""
    with pytest.raises(V.ValidationConfigError, match=r"validation_prompt_library=.*: unreadable \(ValueError: key "
                                                      r"'a' appears twice\)"):
        V.settings_from_config(config(tmp_path, '{"a": "x", "a": "y"}'))
    with pytest.raises(V.ValidationConfigError, match=r"validation_prompt_library=.*: unreadable \(JSONDecodeError: Expecting"):
        V.settings_from_config(config(tmp_path, '{"cat": "a cat",}'))
    with pytest.raises(V.ValidationConfigError, match=r"expected a JSON object \{name: prompt\}, got list"):
        V.settings_from_config(config(tmp_path, ["a cat"]))
    with pytest.raises(V.ValidationConfigError, match=r"entry 'cat' has no prompt text"):
        V.settings_from_config(config(tmp_path, {"cat": {"text": "a cat"}}))
    with pytest.raises(V.ValidationConfigError, match=r"unreadable"):
        V.settings_from_config(config(tmp_path, validation_prompt_library=str(tmp_path / "missing.json")))


def test_validation_settings_that_failed_every_round_are_refused():
    """Each of these was accepted, then every validation round failed (or rendered black)."""
    refused = {"validation_resolution": ("0x32", r"validation_resolution 0x32: .*at least 16"),
               "validation_fps": (0, r"validation_fps=0: expected an integer >= 1"),
               "validation_guidance": (math.inf, r"validation_guidance=inf: expected a finite number"),
               "validation_flow_shift": (math.inf, r"validation_flow_shift=inf: expected a finite number > 0")}
    for key, (value, match) in refused.items():
        with pytest.raises(V.ValidationConfigError, match=match):
            V.settings_from_config(config(**{key: value}))
    with pytest.raises(V.ValidationConfigError, match=r"validation_guidance=nan"):
        V.settings_from_config(config(validation_guidance=math.nan))
    # a size listed twice is rendered once (it wrote the same files twice)
    assert V.settings_from_config(config(validation_resolution="48x32, 48x32,32x48")).sizes == ((48, 32), (32, 48))
    # still accepted: guidance <= 1 (no CFG, as WanPipeline), frames rounded to 4k+1 as WanPipeline does
    assert V.settings_from_config(config(validation_guidance=1.0)).guidance == 1.0
    assert V.settings_from_config(config(validation_num_video_frames=16)).frames == 17


def test_validation_fps_defaults_to_the_pipelines(tmp_path):
    """validation_fps None: 24 for a TI2V-5B pipeline (model_index.json expand_timesteps), else 16; a set value wins."""
    assert V.settings_from_config(config()).fps is None and V.settings_from_config(config(validation_fps=30)).fps == 30
    (tmp_path / "model_index.json").write_text(json.dumps({"expand_timesteps": True}))
    assert V._pipeline_fps(tmp_path) == 24 and V._pipeline_fps(tmp_path / "missing") == 16



# -- 3. context parallelism -------------------------------------------------------------------------------------
def _context_config(context, **overrides):
    c = config(**overrides)
    c.mesh.context = context
    return c


def test_validation_clip_tokens_must_divide_the_context_axis():
    """With mesh.context=2 a 48x48, 9-frame clip is 3 x 3 x 3 = 27 tokens (8x VAE, 2x2 patch), which the
    transformer cannot split over `context`: every validation round failed (logged) and the run ended without
    videos. Refused with the token count and a frame count that fits; sizes that fit pass."""
    tiny = vae.VaeConfig(**TINY_VAE)
    s = V.settings_from_config(_context_config(2, validation_resolution="48x48", validation_num_video_frames=9))
    assert s.context == 2
    with pytest.raises(V.ValidationConfigError, match=r"^validation_resolution 48x48, validation_num_video_frames=9: "
                                                      r"3 x 3 x 3 = 27 tokens per clip, not divisible by "
                                                      r"mesh\.context=2 .*; e\.g\. validation_num_video_frames=13$"):
        V.check_video_size(s, tiny, TINY_TRANSFORMER.patch_size)
    for context, res, frames in ((1, "48x48", 9), (2, "48x48", 13), (2, "48x32", 9), (4, "64x64", 9)):
        s = V.settings_from_config(_context_config(context, validation_resolution=res,
                                                   validation_num_video_frames=frames))
        V.check_video_size(s, tiny, TINY_TRANSFORMER.patch_size)  # 27, 36, 18, 48 tokens
    # a list is checked size by size: 48x32 fits context=2, 48x48 does not
    s = V.settings_from_config(_context_config(2, validation_resolution="48x32,48x48", validation_num_video_frames=9))
    with pytest.raises(V.ValidationConfigError, match=r"validation_resolution 48x48, .* 27 tokens"):
        V.check_video_size(s, tiny, TINY_TRANSFORMER.patch_size)


def test_validation_context_fill_axis_counts_the_devices():
    """mesh.context=-1 takes the devices the other axes leave, as make_mesh does (8 simulated CPU devices)."""
    assert len(jax.devices()) == 8
    c = _context_config(-1)
    c.mesh.fsdp, c.mesh.data = 2, 1
    assert V.mesh_context_size(c) == 4
    c.mesh.fsdp = 3  # does not divide 8: make_mesh refuses it itself
    assert V.mesh_context_size(c) == 1
    assert V.mesh_context_size(config()) == 1


def test_validation_validator_refuses_context_tokens_before_encoding(tmp_path):
    """The Validator (built at start, before the base loads and before any step) refuses the clip -- before
    prompt encoding or VAE weight reads (neither exists here); the trainer turns this into its ConfigError."""
    s = V.settings_from_config(_context_config(2, validation_resolution="48x48", validation_num_video_frames=9))
    root = pipeline(tmp_path, TINY_VAE, weights=False)
    (tmp_path / "empty-cache").mkdir()
    with pytest.raises(V.ValidationConfigError, match=r"27 tokens per clip, not divisible by mesh\.context=2"):
        V.Validator(s, output_dir=tmp_path / "out", pipeline=str(root), cache_dir=tmp_path / "empty-cache",
                    text_len=TEXT_LEN, model_config=TINY_TRANSFORMER)
