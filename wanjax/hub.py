"""Hugging Face Hub publishing: a SimpleTuner-style model card and a pusher that never stops training.

`model_card` is a pure function of the run's settings. `HubPusher` uploads the exported LoRA, README.md and
validation videos (`push_final`) and, with `push_checkpoints_to_hub`, each checkpoint's LoRA into a
`checkpoint-<step>/` folder. Without a token, with `HF_HUB_OFFLINE` set, or when the hub cannot be reached, it logs
one warning naming the repo and the reason and disables itself: the run goes on and its files stay in output_dir.
Upload failures are logged and reported as `False`, never raised. Only process 0 talks to the hub.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import yaml

from wanjax.methods.dcm import DETAIL_EXPORT
from wanjax.model_source import read_model_index, resolve_model, two_experts

logger = logging.getLogger(__name__)

METHODS = ("lora", "dmd", "dcm", "full")
_TRUE = ("1", "true", "yes", "on")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_STUDENT = "It samples in a few steps without CFG."
_ABOUT = {  # method -> (what the weights are, how they were trained)
    "lora": ("a LoRA", "Trained with flow matching."),
    "full": ("a full fine-tune", "Trained with flow matching."),
    "dmd": ("a few-step student LoRA", ("Distilled with Distribution Matching Distillation (DMD): the base model is "
                                        f"the teacher and a second LoRA the fake-score critic. {_STUDENT}")),
    "dcm": ("a few-step student LoRA", ("Distilled with Dual-expert Consistency Model (DCM) distillation: phased "
                                        f"consistency over the teacher's Euler trajectory. {_STUDENT}")),
}


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in _TRUE if isinstance(value, str) else bool(value)


# =========================================================================================================
# Model card
# =========================================================================================================
def _settings_lines(settings: dict, indent: int = 0) -> list[str]:
    lines = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines.append(f"{'  ' * indent}- {key}:")
            lines += _settings_lines(value, indent + 1)
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        lines.append(f"{'  ' * indent}- {key}: `{value}`")
    return lines


PLACEHOLDER_NAMESPACE = "YOUR_USERNAME"


def snippet_repo_id(repo_id: str) -> str:
    """The repo id the card's snippet loads: `repo_id` when it has a namespace ("user/name"), else
    "YOUR_USERNAME/name" (a bare name is no loadable hub id; the reader fills in the namespace)."""
    return repo_id if "/" in repo_id else f"{PLACEHOLDER_NAMESPACE}/{repo_id}"


def step_sigmas(sigmas) -> list[float]:
    """A student's step sigmas as diffusers' `set_timesteps(sigmas=...)` takes them: a trailing 0 (DCM's meta
    grid ends in it) dropped, since diffusers appends the terminal 0 itself (with it, N + 1 model evaluations)."""
    s = [float(x) for x in sigmas]
    while len(s) > 1 and s[-1] == 0:
        s.pop()
    return s


DETAIL_LORA_FILE = f"{DETAIL_EXPORT}.safetensors"  # DCM dual experts' second export


def base_fps(pipeline: str) -> int | None:
    """The base pipeline's video frame rate (`video_out.pipeline_fps`) from its model_index.json in the local folder
    `pipeline` or, for a hub id, in the local hub cache (never downloaded); None where neither has it."""
    from wanjax.video_out import pipeline_fps

    index = read_model_index(pipeline, hub_cache=True)
    return None if index is None else pipeline_fps(index)


def _usage(*, base_model: str, method: str, repo_id: str, lora: bool, prompt: str, sampling: dict,
           transformer: str, single_expert: bool = False, experts: list[str] | None = None,
           fps: int | None = None) -> str:
    i2v = "i2v" in base_model.lower() and "ti2v" not in base_model.lower()
    pipeline = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    fps = fps or (24 if "ti2v" in base_model.lower() else 16)  # without model_index.json: TI2V-5B by its name
    sampling = dict(sampling)
    sigmas = sampling.pop("sigmas", None)
    sigmas = step_sigmas(sigmas) if sigmas else None
    low = single_expert and transformer == "transformer_2"
    classes = [pipeline, *(["WanTransformer3DModel"] if low else []),
               *(["FlowMatchEulerDiscreteScheduler"] if sigmas else [])]
    imports = [f"from diffusers import {', '.join(classes)}"]
    imports.append("from diffusers.utils import export_to_video" + (", load_image" if i2v else ""))
    lines = ["import torch", *imports, ""]
    if lora and single_expert:
        # the weights adapt one expert of a two-expert (Wan 2.2 A14B) base: load that expert alone, so that every
        # step runs on it (the two-expert pipeline would hand the steps below boundary_ratio to the other one)
        lines.append(f"# every step on the {transformer} expert this LoRA adapts: no transformer_2, no boundary")
        kw = "transformer_2=None, boundary_ratio=None, torch_dtype=torch.bfloat16"
        if low:
            lines += [f"transformer = WanTransformer3DModel.from_pretrained({base_model!r}, subfolder='transformer_2', "
                      "torch_dtype=torch.bfloat16)",
                      f"pipe = {pipeline}.from_pretrained({base_model!r}, transformer=transformer, {kw})"]
        else:
            lines.append(f"pipe = {pipeline}.from_pretrained({base_model!r}, {kw})")
        lines += _lora_loads(repo_id, "", experts)
    elif lora:
        extra = ", load_into_transformer_2=True" if transformer == "transformer_2" else ""
        lines += [f"pipe = {pipeline}.from_pretrained({base_model!r}, torch_dtype=torch.bfloat16)",
                  *_lora_loads(repo_id, extra, experts)]
    else:
        lines += [f"pipe = {pipeline}.from_pretrained({repo_id!r}, torch_dtype=torch.bfloat16)"]
    if sigmas:
        # WanPipeline only passes N to set_timesteps: pin the student's sigmas (shift 1 keeps them as they are)
        lines += ["", "", "class StudentScheduler(FlowMatchEulerDiscreteScheduler):",
                  "    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):",
                  f"        super().set_timesteps(sigmas={[float(s) for s in sigmas]!r}, device=device)", "", "",
                  f"pipe.scheduler = StudentScheduler(shift=1.0, stochastic_sampling={method == 'dmd'})"]
        sampling["num_inference_steps"] = len(sigmas)
    switch = bool(lora and experts)
    if switch:
        # DCM dual experts: one adapter per student step, switched after each step by the pipeline's callback
        lines += ["", "", f"EXPERTS = {list(experts)!r}  # the LoRA of each student step", "",
                  "", "def switch_expert(pipe, i, t, callback_kwargs):  # after step i: step i + 1's LoRA",
                  "    if i + 1 < len(EXPERTS):", "        pipe.set_adapters(EXPERTS[i + 1])", "    return {}", "", "",
                  "pipe.set_adapters(EXPERTS[0])"]
    lines += ["pipe.to('cuda')", ""]
    args = [f"    prompt={prompt!r},"]
    if i2v:
        args.append("    image=load_image('first_frame.png'),")
    args += [f"    {k}={v!r}," for k, v in sampling.items()]
    if switch:
        args.append("    callback_on_step_end=switch_expert,")
    lines += ["video = pipe(", *args, ").frames[0]", f"export_to_video(video, 'output.mp4', fps={fps})"]
    return "\n".join(lines)


def _lora_loads(repo_id: str, extra: str, experts: list[str] | None) -> list[str]:
    """The snippet's load_lora_weights lines: the LoRA, or (DCM dual experts) both, as adapters "semantic" and
    "detail"."""
    if not experts:
        return [f"pipe.load_lora_weights({repo_id!r}{extra})"]
    return [f"pipe.load_lora_weights({repo_id!r}, adapter_name='semantic'{extra})",
            f"pipe.load_lora_weights({repo_id!r}, weight_name={DETAIL_LORA_FILE!r}, adapter_name='detail'{extra})"]


def model_card(
    *,
    base_model: str,
    method: str,
    settings: dict,
    repo_id: str,
    validation: list[dict] | None = None,
    lora: bool = True,
    sampling: dict | None = None,
    transformer: str = "transformer",
    note: str | None = None,
    single_expert: bool = False,
    experts: list[str] | None = None,
    fps: int | None = None,
) -> str:
    """README.md text for the hub repo: YAML front matter (base model, tags, widget with the validation videos)
    and a body with the method, the training settings and a diffusers snippet.

    settings: label -> value, shown as a list (a dict value becomes a nested list; None is left out).
    validation: [{"prompt": str, "path": mp4 path relative to the repo root}].
    sampling: keyword arguments of the pipeline call in the snippet (num_inference_steps, guidance_scale,
      negative_prompt, ...); "sigmas" installs a scheduler pinned to a distilled student's step sigmas.
    transformer: "transformer_2" when the LoRA adapts Wan 2.2's low-noise expert (load_into_transformer_2).
    single_expert: the base has two experts (Wan 2.2 A14B) but the weights are meant to run every step on
      `transformer` (a few-step student): the snippet loads that expert alone (transformer_2=None,
      boundary_ratio=None; the low-noise one from subfolder transformer_2).
    experts: DCM dual experts, the adapter of each student step ("semantic" | "detail"): the snippet loads both LoRAs
      (the detail one from DETAIL_LORA_FILE) and switches them per step with callback_on_step_end.
    fps: the snippet's export frame rate (`base_fps`); None: 24 for a base named TI2V, else 16.
    repo_id without a namespace ("name"): the snippet loads "YOUR_USERNAME/name" and the card says to fill it in."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    validation = list(validation or [])
    sampling = dict(sampling or {})
    if method in ("dmd", "dcm"):
        sampling.setdefault("guidance_scale", 1.0)
    else:
        sampling.setdefault("num_inference_steps", 50)
        sampling.setdefault("guidance_scale", 5.0)
    negative = sampling.get("negative_prompt")
    i2v = "i2v" in base_model.lower() and "ti2v" not in base_model.lower()

    front: dict[str, Any] = {"license": "apache-2.0"}  # Wan's license; the adapter's own terms are the author's
    if _HUB_ID.match(base_model):  # a local path is no valid `base_model`
        front["base_model"] = base_model
        front["base_model_relation"] = "adapter" if lora else "finetune"
    front["library_name"] = "diffusers"
    front["pipeline_tag"] = "image-to-video" if i2v else "text-to-video"
    tags = [front["pipeline_tag"], "diffusers", "wan", "wanjax"]
    if lora:
        tags += ["lora", "template:sd-lora"]
    if method in ("dmd", "dcm"):
        tags += ["distillation", method]
    front["tags"] = tags
    if validation:
        widget = []
        for v in validation:
            item: dict[str, Any] = {"text": v["prompt"] or "unconditional (blank prompt)"}
            if negative:
                item["parameters"] = {"negative_prompt": negative}
            item["output"] = {"url": Path(v["path"]).as_posix()}
            widget.append(item)
        front["widget"] = widget
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=10_000)

    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if "base_model" in front else f"`{base_model}`"
    what, how = _ABOUT[method]
    about = f"This is {what} for {base_link}, trained with wanjax (JAX/Flax) from a SimpleTuner-style config. {how}"
    body = [f"# {repo_id}", "", about]
    if note:
        body += ["", note.strip()]
    load_id = snippet_repo_id(repo_id)
    if load_id != repo_id:
        body += ["", f"The snippet below loads `{load_id}`: replace `{PLACEHOLDER_NAMESPACE}` with the namespace "
                     "(user or organisation) this repository was uploaded to."]
    if validation:
        body += ["", "## Validation", "", "Videos sampled with the weights in this repository:", "",
                 *(f"- `{v['path']}`: {v['prompt'] or '(blank prompt)'}" for v in validation), "", "<Gallery />"]
    body += ["", "## Training settings", "", *_settings_lines(settings)]
    prompt = next((v["prompt"] for v in validation if v.get("prompt")), "A cat walks on the grass, realistic style.")
    usage = _usage(base_model=base_model, method=method, repo_id=load_id, lora=lora, prompt=prompt,
                   sampling=sampling, transformer=transformer, single_expert=single_expert, experts=experts,
                   fps=fps)
    body += ["", "## Inference", "", "```python", usage, "```", ""]
    return f"---\n{header}---\n\n" + "\n".join(body)


def card_from_config(config, *, repo_id: str, steps: int, meta: dict | None = None,
                     validation: list[dict] | None = None, extra: dict | None = None) -> str:
    """`model_card` for a wanjax run: `config` (ConfigDict), the trainer's checkpoint `meta` (method, resolved
    LoRA rank / alpha / targets, the student's sigmas), `extra` settings the trainer knows (e.g. latent shapes)."""
    meta = dict(meta or {})
    lora_meta = meta.get("lora", {})
    method = meta.get("method") or config.get("distillation_method") or "lora"
    lora = config.get("model_type", "lora") == "lora"
    rank = lora_meta.get("rank", config.get("lora_rank"))
    alpha = lora_meta.get("alpha", config.get("lora_alpha") or rank)
    optimizer = config.get("optimizer")
    if config.get("optimizer_config"):
        optimizer = f"{optimizer} ({config.get('optimizer_config')})"
    settings: dict[str, Any] = {
        "Training steps": steps,
        "Learning rate": config.get("learning_rate"),
        "LR scheduler": f"{config.get('lr_scheduler')} (warmup {config.get('lr_warmup_steps', 0)} steps)",
        "Optimizer": optimizer,
        "Batch size (global, per optimizer step)": config.get("train_batch_size"),
        "Gradient accumulation steps": config.get("gradient_accumulation_steps"),
        "Max grad norm": f"{config.get('max_grad_norm')} ({config.get('grad_clip_method')})",
        "Base model precision": config.get("mixed_precision"),
        "Seed": config.get("seed"),
    }
    if lora:
        settings.update({"LoRA rank": rank, "LoRA alpha": alpha,
                         "LoRA targets": lora_meta.get("targets", config.get("lora_target_modules"))})
    settings["Flow schedule shift"] = config.get("flow_schedule_shift")
    if config.get("resolution"):
        settings["Resolution"] = f"{config.get('resolution')} ({config.get('resolution_type') or 'pixel'})"
    if config.get("model_flavour"):
        settings["Model flavour"] = config.get("model_flavour")
    if config.get("use_ema"):
        settings["EMA"] = f"decay {config.get('ema_decay')}, every {config.get('ema_update_interval')} steps"
    d = config.get("distillation_config") or {}
    student = meta.get("student", {})
    if method == "dmd":
        settings["DMD"] = {
            "Denoising steps (timesteps)": d.get("dmd_denoising_steps"),
            "Real score guidance scale": d.get("real_score_guidance_scale"),
            "Fake score guidance scale": d.get("fake_score_guidance_scale"),
            "Fake score LR": d.get("fake_score_lr"),
            "Generator update interval": d.get("generator_update_interval"),
            "Timestep ratio range": f"{d.get('min_timestep_ratio')} - {d.get('max_timestep_ratio')}",
            "Training latent frames": d.get("num_training_frames"),
            "Student sigmas": step_sigmas(student["sigmas"]) if student.get("sigmas") else None,
        }
    elif method == "dcm":
        settings["DCM"] = {
            "Mode": d.get("mode"),
            "Teacher Euler steps": student.get("euler_steps", d.get("euler_steps") or d.get("euler_timesteps")),
            "Phases (student steps)": d.get("multiphase"),
            "Teacher CFG": d.get("distill_cfg"),
            "Consistency target": d.get("target_model"),
            "Adversarial weight": d.get("adv_weight") if d.get("mode") == "fine" else None,
            "Dual experts": f"yes (boundary {d.get('expert_boundary')})" if d.get("dual_experts") else "no",
            "Student sigmas": step_sigmas(student["sigmas"]) if student.get("sigmas") else None,
        }
    settings.update(extra or {})
    sampling: dict[str, Any] = {}
    if config.get("validation_negative_prompt") and method not in ("dmd", "dcm"):  # students run without CFG
        sampling["negative_prompt"] = config.get("validation_negative_prompt")
    if method in ("dmd", "dcm") and student.get("sigmas"):
        sampling["sigmas"] = step_sigmas(student["sigmas"])
    note = config.get("model_card_note")
    experts = None
    if method == "dcm" and d.get("dual_experts"):
        experts = student.get("experts")
        sigmas, switch = step_sigmas(student.get("sigmas") or []), student.get("switch_sigma")
        if not experts and sigmas and switch is not None:  # the trainer's rule: detail from sigma <= switch
            experts = ["detail" if s <= float(switch) else "semantic" for s in sigmas]
        which = (f" (per student step: {', '.join(experts)})" if experts else "")
        snippet = (" The snippet below loads both and switches them after each step." if experts and lora else
                   " (see wanjax's scripts/run_student_diffusers.py --lora-switch / --experts)")
        note = ((note or "") + f"\n\nThe detail expert is `{DETAIL_LORA_FILE}`; it runs the steps that start at "
                f"sigma <= {switch}{which}, the other LoRA the earlier ones.{snippet}").strip()
    source = resolve_model(config)
    return model_card(base_model=source.pipeline, method=method, settings=settings,
                      repo_id=repo_id, validation=validation, lora=lora, sampling=sampling,
                      transformer="transformer_2" if source.expert == "transformer_2" else "transformer", note=note,
                      single_expert=lora and method in ("dmd", "dcm") and _two_expert_base(config, source),
                      experts=experts, fps=base_fps(source.pipeline))


def _two_expert_base(config, source) -> bool:
    """Whether the base pipeline has two experts (Wan 2.2 A14B): a -high/-low flavour, the transformer_2
    subfolder, or a local pipeline folder whose model_index.json names transformer_2 and a boundary_ratio."""
    flavour = str(config.get("model_flavour") or "")
    if flavour.endswith(("-2.2-high", "-2.2-low")) or "transformer_2" in (source.subfolder, source.expert):
        return True
    index = read_model_index(source.pipeline)
    return index is not None and two_experts(index)


def write_model_card(output_dir: str | os.PathLike, text: str) -> Path:
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# =========================================================================================================
# Pushing
# =========================================================================================================
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception as e:  # noqa: BLE001 - e.g. a failed OIDC exchange: no token, same as not logged in
        logger.debug("huggingface_hub.get_token failed: %s", e)
        return None


class HubPusher:
    """Pushes a run's LoRA to `hub_model_id` (process 0). `enabled` is False (with `reason`) when it cannot."""

    def __init__(self, hub_model_id: str, *, token: str | None = None, private: bool = False,
                 push_checkpoints: bool = False):
        self.repo_id = hub_model_id
        self.push_checkpoints = push_checkpoints
        self.enabled = False
        self.reason: str | None = None
        self._api = None
        if jax.process_index() != 0:
            self.reason = "only process 0 pushes"
            return
        self.reason = self._connect(token, private)
        if self.reason:
            logger.warning("push_to_hub: not pushing to %r: %s. Training goes on; the LoRA stays in output_dir.",
                           hub_model_id, self.reason)

    def _connect(self, token: str | None, private: bool) -> str | None:
        if not self.repo_id:
            return "hub_model_id is empty"
        if _offline():
            return "HF_HUB_OFFLINE is set"
        token = _resolve_token(token)
        if not token:
            return "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
        from huggingface_hub import HfApi

        api = HfApi(token=token, library_name="wanjax")
        try:
            url = api.create_repo(self.repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        except Exception as e:  # noqa: BLE001 - connection, HTTP 401/403, bad name: all mean "cannot push"
            return f"the hub cannot be reached or refused the repo ({type(e).__name__}: {e})"
        self.repo_id = getattr(url, "repo_id", None) or self.repo_id  # "name" -> "user/name"
        self._api = api
        self.enabled = True
        logger.info("push_to_hub: pushing to https://huggingface.co/%s", self.repo_id)
        return None

    def _commit(self, uploads: list[tuple[Path, str]], message: str) -> bool:
        from huggingface_hub import CommitOperationAdd

        try:
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for path, name in uploads]
            self._api.create_commit(self.repo_id, ops, commit_message=message, repo_type="model",
                                    run_as_future=False)
        except Exception as e:  # noqa: BLE001 - a failed upload must not stop the run; files stay local
            logger.warning("push_to_hub: uploading %s to %r failed (%s: %s); training goes on",
                           ", ".join(name for _, name in uploads), self.repo_id, type(e).__name__, e)
            return False
        logger.info("push_to_hub: uploaded %s to %s", ", ".join(name for _, name in uploads), self.repo_id)
        return True

    @staticmethod
    def _collect(paths: Sequence[str | os.PathLike], root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
        """(file, path in repo relative to root) for each path (a folder contributes its files); missing ones."""
        found, missing = [], []
        for p in paths:
            p = Path(p) if Path(p).is_absolute() else root / p
            files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
            for f in files:
                if not f.is_file():
                    missing.append(str(f))
                    continue
                try:
                    name = f.resolve().relative_to(root.resolve()).as_posix()
                except ValueError:  # outside root: at the repo's top level
                    name = f.name
                found.append((f, name))
        return found, missing

    def push_final(self, output_dir: str | os.PathLike, files: Sequence[str | os.PathLike], card_text: str, *,
                   commit_message: str | None = None) -> bool:
        """Write README.md into output_dir (whether or not pushing works, so output_dir reads like the repo) and
        upload it with `files` (LoRA files, validation videos; absolute or relative to output_dir, each to its
        path relative to output_dir) in one commit. True when everything was uploaded."""
        if jax.process_index() != 0:
            return False
        root = Path(output_dir)
        try:
            readme = write_model_card(root, card_text)
        except OSError as e:
            logger.warning("push_to_hub: cannot write %s/README.md (%s)", root, e)
            readme = None
        if not self.enabled:
            return False
        uploads, missing = self._collect(files, root)
        if missing:
            logger.warning("push_to_hub: missing files not uploaded: %s", ", ".join(missing))
        if readme is not None:
            uploads = [u for u in uploads if u[1] != "README.md"] + [(readme, "README.md")]
        ok = self._commit(uploads, commit_message or "wanjax: final LoRA, model card and validation videos")
        return ok and not missing and readme is not None

    def push_checkpoint(self, step: int, files: Sequence[str | os.PathLike]) -> bool:
        """With push_checkpoints: upload a checkpoint's exported LoRA file(s) (a folder: its files) into
        `checkpoint-<step>/` of the repo. True when uploaded."""
        if not (self.enabled and self.push_checkpoints) or jax.process_index() != 0:
            return False
        uploads, missing = [], []
        for p in map(Path, files):
            p = p.absolute()
            got, lost = self._collect([p], p if p.is_dir() else p.parent)
            uploads += got
            missing += lost
        if missing:
            logger.warning("push_to_hub: checkpoint %d: missing files not uploaded: %s", step, ", ".join(missing))
        if not uploads:
            return False
        uploads = [(path, f"checkpoint-{step}/{name}") for path, name in uploads]
        return self._commit(uploads, f"wanjax: checkpoint {step}") and not missing


def pusher_from_config(config) -> HubPusher | None:
    """A HubPusher for `push_to_hub` (None when off); the repo is hub_model_id, else tracker_project_name
    (SimpleTuner's fallback). The token comes from HF_TOKEN / `hf auth login`, never from the config (it is saved
    to output_dir/config.json)."""
    if not _truthy(config.get("push_to_hub", False)):
        return None
    repo = config.get("hub_model_id") or config.get("tracker_project_name")
    return HubPusher(repo, private=_truthy(config.get("hub_private", False)),
                     push_checkpoints=_truthy(config.get("push_checkpoints_to_hub", False)))
