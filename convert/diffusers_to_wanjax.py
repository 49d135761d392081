"""Convert a Wan transformer to a wanjax checkpoint, streaming tensor by tensor.

    python convert/diffusers_to_wanjax.py --src PATH --dst DIR [--dtype bfloat16|float32]

PATH: anything `wanjax.load_transformer` accepts (diffusers model or pipeline folder, original/ComfyUI
single file, hub repo id). The result loads with `wanjax.load_transformer(DIR)`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def main(argv=None):
    args = _cli.parser(__doc__.splitlines()[0]).parse_args(argv)

    def convert():
        from wanjax.transformer_io import open_reader, write_wanjax

        reader = open_reader(args.src, subfolder=args.subfolder)
        write_wanjax(reader, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote wanjax checkpoint {args.dst} ({reader.config.num_layers} layers, D={reader.config.inner_dim})")

    _cli.run(convert)


if __name__ == "__main__":
    main()
