"""The device mesh and how parameters and batches are laid out on it. The only module that knows mesh axes.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `context` (sequence
parallel), `tensor` (heads / MLP). A size of -1 takes whatever devices remain.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical dimension name -> mesh axes it is split over.
LOGICAL_RULES = {
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": None,
    "batch": ("data", "fsdp"),
    "length": "context",
}


def make_mesh(data: int = 1, fsdp: int = -1, context: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A 4-axis mesh over `devices` (default: all); one size may be -1 to fill."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, context, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical names of a transformer param's dimensions, from its path (stacked blocks lead with 'layers')."""
    lead = ("layers",) if path[0] == "blocks" else ()
    rest = ndim - len(lead)
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    if leaf == "kernel" and rest == 2:
        if module in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
            return lead + ("embed", "heads")
        if module == "to_out":
            return lead + ("heads", "embed")
        if module == "proj_in" and "ffn" in path:
            return lead + ("embed", "mlp")
        if module == "proj_out" and "ffn" in path:
            return lead + ("mlp", "embed")
        return lead + ("embed", None)
    return lead + (None,) * rest


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for logical axes; a dimension the mesh axes do not divide stays replicated."""
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        if mesh_axes is not None:
            size = math.prod(mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
            if size == 1 or dim % size:
                mesh_axes = None
        spec.append(mesh_axes)
    return P(*spec)


def param_shardings(shapes: dict, mesh: Mesh) -> dict:
    """NamedShardings for a params tree (of arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        return NamedSharding(mesh, logical_to_spec(param_logical_axes(names, len(leaf.shape)), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, shapes)
