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


def fsdp_shardings(tree, mesh: Mesh, *, stacked_prefix: str = "blocks") -> dict:
    """Shard each leaf's largest dimension that `fsdp` divides (never a stacked layer axis); small or
    indivisible leaves stay replicated. For trainables (LoRA, optimizer moments, EMA): equal shapes get
    equal specs, so moments line up with their parameters."""
    size = mesh.shape["fsdp"]

    def one(path, leaf):
        shape = tuple(leaf.shape)
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        skip_first = stacked_prefix in names and len(shape) >= 3
        spec = [None] * len(shape)
        candidates = [i for i in range(len(shape)) if not (skip_first and i == 0)]
        if size > 1 and candidates:
            best = max(candidates, key=lambda i: shape[i])
            if shape[best] % size == 0 and shape[best] >= size:
                spec[best] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, *, batch_axis: int = 0) -> NamedSharding:
    """Split the batch axis over data x fsdp; everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> bool:
    """Start multi-process JAX when the environment asks for it; returns whether it did.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (e.g. localhost tests, custom
    launchers). Otherwise JAX's own detection on multi-worker TPU slices and multi-task SLURM jobs.
    """
    import os

    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
        # Cross-process collectives for CPU devices (tests on localhost); no effect on GPU/TPU backends.
        # Must not query the backend here: initialize() has to run before any backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    slurm_multi = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    tpu_multi = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm_multi or tpu_multi:
        jax.distributed.initialize()
        return True
    return False
