"""Export the LoRA of a training checkpoint to a file diffusers (or ComfyUI) loads.

    python convert/export_lora.py --src OUTPUT_DIR/checkpoints/STEP --dst FILE [--format diffusers|comfyui]
                                  [--weights auto|ema|lora]

--src may also be an output_dir (its newest checkpoint is used). `auto` exports the EMA weights when the
run kept them (as the trainer's final export does), else the trained LoRA.
"""

import argparse
import json
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--format", choices=["diffusers", "comfyui"], default="diffusers")
    p.add_argument("--weights", choices=["auto", "ema", "lora"], default="auto")
    args = p.parse_args(argv)

    def export():
        import orbax.checkpoint as ocp

        from wanjax import lora as lora_lib

        ckpt = find_checkpoint(Path(args.src).absolute())
        meta_path = ckpt / "meta"
        meta_file = meta_path if meta_path.is_file() else next(meta_path.glob("*"), None)
        if meta_file is None:
            raise FileNotFoundError(f"{ckpt}: checkpoint has no metadata")
        meta = json.loads(meta_file.read_text())["lora"]
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(ckpt / "state")
        ema = state.get("ema")
        if args.weights == "ema" and not ema:
            raise ValueError(f"{ckpt}: --weights ema, but this run kept no EMA")
        trained = state[meta.get("state_key", "lora")]  # "gen" for a DMD / DCM student
        params = ema if (args.weights == "ema" or (args.weights == "auto" and ema)) else trained
        lora = lora_lib.LoraWeights(params=params, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                                    targets=tuple(meta["targets"]))
        lora_lib.save_lora(lora, args.dst, format=args.format)
        print(f"wrote {args.dst} ({args.format}) from {ckpt}")

    _cli.run(export)


if __name__ == "__main__":
    main()
