"""Shared argument parsing for the converter scripts (thin CLIs over wanjax.transformer_io)."""

from __future__ import annotations

import argparse
import re
import sys

DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def parse_size(text: str) -> int:
    """'10GB', '500MB', '1234' -> bytes (decimal units, as diffusers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 10GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--src", required=True, help="source checkpoint")
    p.add_argument("--dst", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast tensors (default: keep stored dtypes)")
    p.add_argument("--subfolder", default=None, help="pipeline subfolder: transformer (default) or transformer_2")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("10GB"), help="shard above this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --dst")
    return p


def run(fn) -> None:
    """Run `fn()`; turn bad-input and filesystem errors (a missing --src, a --dst that is a file, permissions, a
    full disk: every OSError) into one clear line on stderr and exit status 1."""
    try:
        fn()
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line; OSErrors raised by the OS itself ("[Errno 20] Not a directory: 'x'") name
    their path and, for two-path calls (rename), both paths."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        paths = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        text = f"{paths}: {e.strerror}"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__
