"""Convert a wanjax checkpoint to a diffusers folder that `WanTransformer3DModel.from_pretrained` loads.

    python convert/wanjax_to_diffusers.py --src DIR --dst DIR [--dtype bfloat16|float32]

Streams one layer's tensor at a time; shards above --max-shard-size with diffusers' index file.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def main(argv=None):
    args = _cli.parser(__doc__.splitlines()[0]).parse_args(argv)

    def convert():
        from wanjax.transformer_io import open_reader, write_diffusers

        reader = open_reader(args.src, subfolder=args.subfolder)
        write_diffusers(reader, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote diffusers folder {args.dst} ({reader.config.num_layers} layers, D={reader.config.inner_dim})")

    _cli.run(convert)


if __name__ == "__main__":
    main()
