"""Command-line handling shared by `python -m wanjax.train` and `python -m wanjax.cache`: a locked ml_collections
config file with `--config.key=value` overrides, unknown keys refused with a readable message."""

from __future__ import annotations

import logging
import re
import sys


HELP = ("-h", "--help", "-help", "--helpfull")


def usage(prog: str, *, dry_run_flag: bool = False) -> str:
    return (f"usage: python -m {prog} --config CONFIG[:VARIANT] [--config.KEY=VALUE ...]"
            + (" [--dry_run]" if dry_run_flag else "") + "\n\n"
            "  --config       a config file: configs/lora.py, configs/dmd.py, configs/dcm.py (variant :tiny runs the\n"
            "                 embedded tiny model), or configs/simpletuner.py:YOUR_SIMPLETUNER_CONFIG.json\n"
            "  --config.KEY   override one option, e.g. --config.learning_rate=2e-5 --config.mesh.fsdp=8; unknown\n"
            "                 keys are refused\n"
            + ("  --dry_run      print the resolved config (every key) as JSON and exit\n" if dry_run_flag else "")
            + "\nOptions and their SimpleTuner names: README.md and configs/common.py.")


def parse(argv: list[str] | None, *, dry_run_flag: bool = False, prog: str = "wanjax.train"):
    """(config, dry_run) from the command line, or an exit status: 2 after printing the error, 0 after --help."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    if any(a in HELP for a in argv[1:]):
        print(usage(prog, dry_run_flag=dry_run_flag))
        return 0
    fv = flags.FlagValues()
    saved_argv, sys.argv = sys.argv, argv  # config_flags finds `--config.key` overrides in sys.argv itself
    try:
        config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/lora.py:tiny", flag_values=fv,
                                        lock_config=True)
        if dry_run_flag:
            flags.DEFINE_bool("dry_run", False, "print the resolved config as JSON and exit", flag_values=fv)
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: bad command line or config: {explain_flag_error(e)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    if fv.config is None:
        print("error: --config is required, e.g. --config configs/lora.py:tiny", file=sys.stderr)
        return 2
    return fv.config, bool(dry_run_flag and fv.dry_run)


def overridden_keys(argv: list[str]) -> list[str]:
    """The dotted config keys the command line sets (`--config.a.b=v`, `--config.a.b v`), in order."""
    return [m.group(1) for a in argv[1:] if (m := re.match(r"--config\.([\w.]+)", a))]


def explain_flag_error(e: Exception) -> str:
    if isinstance(e, (AttributeError, KeyError)):
        text = str(e)
        key = re.search(r"[\w.]+", text.replace("\\n", " ").replace("Did you mean", " "))
        hint = re.search(r'Did you mean "([\w.]+)"', text)
        name = key.group(0) if key else text
        suggestion = f"; did you mean {hint.group(1)!r}?" if hint else ""
        return f"unknown config key {name!r}{suggestion} (run with --dry_run to list every key)"
    text = str(e)
    if "Traceback (most recent call last)" in text:  # ml_collections wraps a config file's error with its traceback
        head = text.split("Traceback (most recent call last)")[0].strip()
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return f"{head} {last}"
    return text


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / grain narrate every file operation at INFO


def start_jax(config) -> int | None:
    """What a job does before JAX starts a backend: size the GPU memory pool (`config.gpu_memory_fraction`), then
    join a multi-process run if the environment asks for one. Returns an exit code (2) if the config is refused."""
    from wanjax.sharding import maybe_initialize_distributed, set_gpu_memory_fraction

    try:
        in_effect = set_gpu_memory_fraction(config.gpu_memory_fraction)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("wanjax").info("GPU memory pool (GPU backends only): %s of each GPU", in_effect)
    maybe_initialize_distributed()
    return None
