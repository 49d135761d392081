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
    assert local == ModelSource("/models/wan22", "/models/wan22", "transformer_2")
    # the flavour's own repo named explicitly (any case) is fine; an explicit subfolder wins over the flavour's
    same = resolve_model({"model_flavour": "t2v-a14b-2.2-low", "pretrained_transformer_subfolder": "transformer",
                          "pretrained_model_name_or_path": "wan-ai/wan2.2-t2v-a14b-diffusers"})
    assert same.subfolder == "transformer"


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
