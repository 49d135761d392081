"""The device mesh and how parameters and batches are laid out on it. The only module that knows mesh axes.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `context` (sequence
parallel), `tensor` (heads / MLP). A size of -1 takes whatever devices remain.

Context parallelism (long clips): `make_mesh(context=c)` (training: `--config.mesh.context=c`) and run the
jitted function under `with use_mesh(mesh):`. Batches stay split over data x fsdp only (`batch_sharding`);
the transformer splits its tokens over `context` after patchify. Heads must be divisible by c.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wanjax import weights

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
        names = weights.path_names(path)
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


# ---------------------------------------------------------------------------------------------------------
# Activation layouts inside the transformer (context parallelism)
#
# The model reads the mesh set with `jax.set_mesh(mesh)` (`use_mesh` below); with no mesh set, or a
# `context` axis of size 1, none of this applies and the model's XLA graph is unchanged. With context = c > 1
# the token sequence is split over `context` everywhere (patch embedding, norms, modulation, FFN,
# cross-attention queries); self-attention switches the split from tokens to heads around the kernel
# (Ulysses: all-to-all in, attention over all tokens for H/c heads, all-to-all out).
# ---------------------------------------------------------------------------------------------------------
BATCH_AXES = ("data", "fsdp")


def use_mesh(mesh: Mesh):
    """Context manager making `mesh` the one the model's activation shardings refer to (`jax.set_mesh`).

    Run the jitted step (or trace it) inside it: `with use_mesh(mesh): step(state, batch)`."""
    return jax.set_mesh(mesh)


def current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def context_size(mesh=None) -> int:
    """Size of the `context` axis of `mesh` (default: the current mesh); 1 without one."""
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or "context" not in mesh.shape:
        return 1
    return int(mesh.shape["context"])


def _axes(mesh, names: tuple[str, ...], dim: int):
    """The mesh axes among `names` of size > 1 (a spec entry), or None if they are trivial or do not divide dim."""
    axes = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or dim % _size(mesh, axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def token_spec(mesh, shape: tuple[int, ...]) -> P:
    """(B, S, ...) activations: batch over data x fsdp (when it divides), tokens over `context`."""
    c = context_size(mesh)
    if shape[1] % c:
        raise ValueError(
            f"context parallelism: the token sequence ({shape[1]} tokens) must be divisible by the `context` mesh "
            f"axis size {c}"
        )
    return P(_axes(mesh, BATCH_AXES, shape[0]), "context" if c > 1 else None, *([None] * (len(shape) - 2)))


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Pin (B, S, ...) activations to the batch split over data x fsdp and the tokens over `context` (`token_spec`)
    under a mesh in effect (`use_mesh`); identity without one or on one device.

    Without the pin XLA propagates the fsdp-sharded weights' layout into the activations: every device then holds
    the whole global batch split over the width, plus all-reduces of (B, S, FFN) partial sums (scripts/
    memory_report.py measured 42 GiB per device on 8 devices for the 1.3B LoRA step at 480x832x81, against 8.7
    with it)."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, token_spec(mesh, x.shape)))


def attention_specs(mesh, q_shape: tuple[int, ...], *, self_attention: bool) -> tuple[P, P, P]:
    """(q, k/v, out) PartitionSpecs for (B, S, H, D) attention inputs on `mesh`, as the kernel sees them.

    Heads go over `tensor` (when it divides H). With context parallelism, self-attention also splits heads
    over `context` and holds every token (the Ulysses layout), and cross-attention keeps the queries split
    over tokens with the (short) text keys/values replicated over `context`.
    """
    b, s, h, _ = q_shape
    c = context_size(mesh)
    batch = _axes(mesh, BATCH_AXES, b)
    heads = _axes(mesh, ("tensor",), h)
    if c == 1:
        spec = P(batch, None, heads, None)
        return spec, spec, spec
    t = _size(mesh, "tensor") if heads is not None else 1
    if h % (c * t):
        raise ValueError(
            f"context parallelism: num_attention_heads={h} must be divisible by the `context` mesh axis size {c}"
            + (f" times the `tensor` axis size {t}" if t > 1 else "")
        )
    if s % c:
        raise ValueError(
            f"context parallelism: the token sequence ({s} tokens) must be divisible by the `context` mesh axis "
            f"size {c}"
        )
    if self_attention:
        heads_cp = ("tensor", "context") if t > 1 else "context"
        spec = P(batch, None, heads_cp, None)
        return spec, spec, spec
    q = P(batch, "context", heads, None)
    return q, P(batch, None, heads, None), q


def maybe_initialize_distributed() -> bool:
    """Start multi-process JAX when the environment asks for it; returns whether it did.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (e.g. localhost tests, custom
    launchers). Otherwise JAX's own detection on multi-worker TPU slices and multi-task SLURM steps (srun). JAX's
    SLURM detection assumes one task per GPU, each seeing all of its node's GPUs and driving the SLURM_LOCALID-th;
    with one task per node it would drive that node's first GPU only, so then every GPU the task was given is
    passed (`slurm_node_device_ids`). JAX_LOCAL_DEVICE_IDS, when set, overrides both.
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
        ids = slurm_node_device_ids(env) if slurm_multi and not tpu_multi else None
        if ids is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(local_device_ids=ids)  # coordinator, process count and id still from SLURM_*
        return True
    return False


def slurm_node_device_ids(env) -> list[int] | None:
    """The local GPU ids a SLURM task should drive when the step runs one task per node (SLURM_NTASKS ==
    SLURM_STEP_NUM_NODES: every node has at least one task), i.e. all the GPUs it sees: 0 .. n-1 for the n entries of
    CUDA_VISIBLE_DEVICES (ordinals count after that mask), else SLURM_GPUS_ON_NODE. None leaves JAX's default (one
    task per GPU: the SLURM_LOCALID-th), also when JAX_LOCAL_DEVICE_IDS is set (JAX reads it then) or the count is
    unknown."""
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    try:
        one_per_node = int(env["SLURM_NTASKS"]) == int(env["SLURM_STEP_NUM_NODES"])
    except (KeyError, ValueError):
        return None
    if not one_per_node:
        return None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and visible != ["NoDevFiles"]:
        return list(range(len(visible)))
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and int(gpus) > 0:
        return list(range(int(gpus)))
    import logging

    logging.getLogger(__name__).warning(
        "SLURM runs one task per node but neither CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE says how many GPUs it "
        "has: JAX will drive one GPU per task. Set JAX_LOCAL_DEVICE_IDS=0,1,... or launch one task per GPU")
    return None


# JAX's names for its GPU pool's fraction: the newer, and the older one, which every JAX from 0.4 to 0.12 reads (the
# newer one is recent), so that is the one set here; setting both makes JAX refuse to start
MEM_FRACTION_ENV = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def set_gpu_memory_fraction(fraction: float, what: str = "gpu_memory_fraction") -> str:
    """Let JAX's GPU memory pool take `fraction` of each GPU's memory; returns the value in effect, as text.

    JAX's default pool is 75% of the GPU (59.7 GiB of an 80 GB H100: 81559 MiB), too little for what fits an 80 GB
    GPU otherwise (14B DMD with LoRA: ~69 GiB per program). Sets XLA_PYTHON_CLIENT_MEM_FRACTION, which the GPU backend
    reads when it starts, so call this before any JAX computation; a fraction already in the environment (under either
    of JAX's names) is kept. No effect on CPU or TPU."""
    import os

    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{what}={fraction}: expected a fraction of the GPU's memory in (0, 1]")
    for name in MEM_FRACTION_ENV:
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    os.environ[MEM_FRACTION_ENV[1]] = f"{fraction:g}"
    return f"{fraction:g}"
