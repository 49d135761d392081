"""Export the LoRA of a training checkpoint to a file diffusers (or ComfyUI) loads.

    python convert/export_lora.py --src OUTPUT_DIR/checkpoints/STEP --dst FILE|DIR [--format diffusers|comfyui]
                                  [--weights auto|ema|lora]

--src may also be an output_dir (its newest checkpoint is used). `auto` exports the EMA weights when the
run kept them (as the trainer's final export does), else the trained LoRA. The checkpoint is read as host
arrays, so a run trained on any device layout (8 GPUs, a TPU pod slice) exports on one CPU host.
--dst ending in .safetensors is the file written; any other --dst (e.g. `out/` or `out/my-lora`) is a folder,
created if needed, that receives pytorch_lora_weights.safetensors (as diffusers' save_lora_weights writes).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def find_checkpoint(src: Path) -> Path:
    if (src / "state").is_dir() and (src / "meta").exists():
        return src
    root = src / "checkpoints" if (src / "checkpoints").is_dir() else src
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{src}: no checkpoint (expected .../checkpoints/<step>/state)")
    return root / str(steps[0])


def read_meta(ckpt: Path) -> dict:
    """The run's JSON metadata of checkpoint `ckpt`, with its `lora` entry (rank, alpha, targets)."""
    from wanjax.checkpoint import read_meta as read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
    if not isinstance(meta.get("lora"), dict):
        raise ValueError(f"{ckpt / 'meta'}: no 'lora' entry (rank, alpha, targets); not a LoRA training checkpoint?")
    return meta


def restore_host(state_dir: Path, keys) -> dict:
    """The entries `keys` of a checkpoint's state as host numpy arrays, whatever device layout saved them: restoring
    without a target fails with "Topology mismatch" when the saving run had other devices (8 GPUs, a pod slice)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        md = handler.metadata(state_dir)  # the tree of the saved state, leaves ArrayMetadata
    finally:
        handler.close()
    tree = getattr(md, "tree", md)
    if not isinstance(tree, dict):
        raise ValueError(f"{state_dir}: cannot read the tree of the saved state (got {type(md).__name__})")
    with ocp.PyTreeCheckpointer() as ckptr:
        item = {k: tree[k] for k in keys if tree.get(k) is not None}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        except TypeError:  # orbax without partial restore: read the whole state
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            args = ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)
        state = ckptr.restore(state_dir, args=args)
    return {k: state[k] for k in item}


def schedule_free_x(opt_state, params):
    """A schedule-free optimizer's evaluation weights x = (y - (1 - b1) z) / b1 (optax's schedule_free_eval_params)
    from a restored optimizer state (its ScheduleFreeState saved as a dict with `b1` and `z`); None if it has none."""
    from types import SimpleNamespace

    import jax
    import numpy as np
    import optax

    found = []

    def walk(node):
        if isinstance(node, dict):
            if "b1" in node and "z" in node:
                found.append(node)
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(opt_state)
    if not found:
        return None
    state = SimpleNamespace(b1=float(np.asarray(found[0]["b1"])), z=found[0]["z"])  # what optax reads of the state
    x = optax.contrib.schedule_free_eval_params(state, params)
    return jax.tree_util.tree_map(lambda xi, y: np.asarray(xi).astype(y.dtype), x, params)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True, help="a .safetensors file, or a folder for pytorch_lora_weights.safetensors")
    p.add_argument("--format", choices=["diffusers", "comfyui"], default="diffusers")
    p.add_argument("--weights", choices=["auto", "ema", "lora"], default="auto")
    args = p.parse_args(argv)

    def export():
        from wanjax import lora as lora_lib

        ckpt = find_checkpoint(Path(args.src).absolute())
        run_meta = read_meta(ckpt)
        meta = run_meta["lora"]
        state_key = meta.get("state_key", "lora")  # "gen" for a DMD / DCM student
        opt_key = meta.get("opt_key", "opt_state")  # its optimizer state
        # a schedule-free optimizer trains the y sequence; its weights to use are x, from the optimizer state
        schedule_free = "schedulefree" in str(run_meta.get("optimizer", ""))
        keys = (state_key,) + (() if args.weights == "lora" else ("ema",)) + ((opt_key,) if schedule_free else ())
        state = restore_host(ckpt / "state", keys)
        ema = state.get("ema")
        if args.weights == "ema" and not ema:
            raise ValueError(f"{ckpt}: --weights ema, but this run kept no EMA")
        if state_key not in state:
            raise ValueError(f"{ckpt / 'state'}: no {state_key!r} entry (the trained LoRA the metadata names)")
        trained = state[state_key]
        if schedule_free:
            trained = schedule_free_x(state.get(opt_key), trained)
            if trained is None:
                raise ValueError(f"{ckpt / 'state'}: trained with {run_meta['optimizer']} but its {opt_key!r} holds no "
                                 "schedule-free state (b1, z) to compute the weights from")
        params = ema if (args.weights == "ema" or (args.weights == "auto" and ema)) else trained
        lora = lora_lib.LoraWeights(params=params, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                                    targets=tuple(meta["targets"]))
        out = lora_lib.save_lora(lora, args.dst, format=args.format)
        print(f"wrote {out} ({args.format}) from {ckpt}")

    _cli.run(export)


if __name__ == "__main__":
    main()
