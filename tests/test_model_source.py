"""Where the base model is read from: SimpleTuner's model_flavour, pretrained_model_name_or_path,
pretrained_transformer_model_name_or_path and pretrained_transformer_subfolder (wanjax/model_source.py)."""

import pytest

from wanjax.model_source import FLAVOURS, ModelSource, resolve_model

WAN13 = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_flavour_picks_the_repo_and_the_expert():
    assert resolve_model({}) == ModelSource(WAN13, WAN13, "transformer")
    assert resolve_model({"model_flavour": "t2v-480p-14b-2.1"}) == ModelSource(
        "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer")
    low = resolve_model({"model_flavour": "t2v-a14b-2.2-low"})
    assert low.pipeline == FLAVOURS["t2v-a14b-2.2-low"][0] and low.subfolder == "transformer_2"
    # a local copy of the flavour's repo keeps the flavour's expert
    local = resolve_model({"model_flavour": "t2v-a14b-2.2-low", "pretrained_model_name_or_path": "/models/wan22"})
    assert local == ModelSource("/models/wan22", "/models/wan22", "transformer_2", "transformer_2")
    # the flavour's own repo named explicitly (any case) is fine
    same = resolve_model({"model_flavour": "t2v-a14b-2.2-low", "pretrained_transformer_subfolder": "transformer_2",
                          "pretrained_model_name_or_path": "wan-ai/wan2.2-t2v-a14b-diffusers"})
    assert same.subfolder == same.expert == "transformer_2"
    # a custom path keeps the flavour's expert for when it is a pipeline (the loader detects that)
    custom = resolve_model({"model_flavour": "t2v-a14b-2.2-low", "pretrained_transformer_model_name_or_path": "/ft"})
    assert custom == ModelSource(FLAVOURS["t2v-a14b-2.2-low"][0], "/ft", None, "transformer_2")


def test_the_other_expert_and_image_flavours_are_refused():
    """SimpleTuner trains a -high / -low flavour's stage whatever pretrained_transformer_subfolder says: naming the
    other expert is a contradiction. I2V / FLF2V flavours are refused before anything is downloaded."""
    for flavour, other in (("t2v-a14b-2.2-low", "transformer"), ("t2v-a14b-2.2-high", "transformer_2")):
        with pytest.raises(ValueError, match=f"pretrained_transformer_subfolder='{other}' is the other expert than "
                                             f"model_flavour='{flavour}'"):
            resolve_model({"model_flavour": flavour, "pretrained_transformer_subfolder": other})
    assert resolve_model({"model_flavour": "t2v-a14b-2.2-low", "pretrained_transformer_subfolder": "my_low",
                          "pretrained_transformer_model_name_or_path": "/ft"}).subfolder == "my_low"
    for flavour in ("i2v-14b-2.1", "i2v-14b-2.2-low", "flf2v-14b-2.1"):
        with pytest.raises(ValueError, match=f"model_flavour='{flavour}': image-to-video training is not supported"):
            resolve_model({"model_flavour": flavour})


def test_conflicts_and_unknown_flavours_are_refused():
    with pytest.raises(ValueError, match="model_flavour='t2v-480p-14b-2.1'.*Wan2.1-T2V-14B"):
        resolve_model({"model_flavour": "t2v-480p-14b-2.1", "pretrained_model_name_or_path": WAN13})
    with pytest.raises(ValueError, match="model_flavour='flux-dev': expected one of"):
        resolve_model({"model_flavour": "flux-dev"})


def test_custom_transformer_and_subfolder_none():
    """SimpleTuner's "custom fine-tuned Wan" quickstart: the pipeline gives VAE / text encoder, the transformer comes
    from elsewhere; "none" means the path is the transformer itself (folder or .safetensors file)."""
    cfg = {"pretrained_model_name_or_path": WAN13, "pretrained_transformer_model_name_or_path": "/ft/model",
           "pretrained_transformer_subfolder": "none"}
    assert resolve_model(cfg) == ModelSource(WAN13, "/ft/model", None)
    assert resolve_model({**cfg, "pretrained_transformer_subfolder": None}).subfolder is None  # detected on load
    assert resolve_model({**cfg, "pretrained_transformer_subfolder": "transformer"}).subfolder == "transformer"
    assert resolve_model({"pretrained_transformer_subfolder": "None"}) == ModelSource(WAN13, WAN13, None)
