"""maybe_initialize_distributed under faked SLURM environments: the arguments it hands jax.distributed.initialize
(monkeypatched: nothing starts), and what JAX's own SLURM detection makes of them."""

import os

import jax
import pytest

from wanjax import sharding

SLURM_STEP = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[001-004]", SLURM_PROCID="5", SLURM_LOCALID="0",
                  SLURM_NODEID="1")


@pytest.fixture
def env(monkeypatch):
    """A clean environment (no SLURM_*, JAX_*, TPU or GPU masks) plus a recorder in place of initialize()."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "JAX_", "OMPI_")) or k in ("TPU_WORKER_HOSTNAMES", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(k)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        return calls

    return set_env


def test_slurm_one_task_per_node_drives_every_gpu_of_the_node(env):
    """The README's first layout (--ntasks-per-node=1 --gpus-per-node=8, 4 nodes): JAX alone would pin each task to
    GPU SLURM_LOCALID=0, 4 devices in all; every GPU the task sees is passed instead."""
    calls = env(**SLURM_STEP, SLURM_NTASKS="4", SLURM_STEP_NUM_NODES="4", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert sharding.maybe_initialize_distributed() is True
    assert calls == [{"local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7]}]
    # ordinals count after the mask: GPUs 4-7 of a shared node are CUDA's 0-3
    calls.clear()
    env(CUDA_VISIBLE_DEVICES="4,5,6,7")
    sharding.maybe_initialize_distributed()
    assert calls == [{"local_device_ids": [0, 1, 2, 3]}]
    # no mask: SLURM's own count
    calls.clear()
    os.environ.pop("CUDA_VISIBLE_DEVICES")
    env(SLURM_GPUS_ON_NODE="8")
    sharding.maybe_initialize_distributed()
    assert calls == [{"local_device_ids": list(range(8))}]


def test_slurm_one_task_per_gpu_keeps_jax_detection(env):
    """--ntasks-per-node=8 --gpus-per-node=8 (4 nodes, 32 tasks): JAX's default (task i of a node drives its GPU i)."""
    calls = env(**SLURM_STEP, SLURM_NTASKS="32", SLURM_STEP_NUM_NODES="4", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert sharding.maybe_initialize_distributed() is True
    assert calls == [{}]


def test_slurm_overrides_and_unknowns_keep_jax_detection(env, caplog):
    # JAX_LOCAL_DEVICE_IDS: JAX reads it itself when no ids are passed
    calls = env(**SLURM_STEP, SLURM_NTASKS="4", SLURM_STEP_NUM_NODES="4", CUDA_VISIBLE_DEVICES="0,1",
                JAX_LOCAL_DEVICE_IDS="0")
    sharding.maybe_initialize_distributed()
    assert calls == [{}]
    # one task per node with no GPU count: JAX's default, with a warning saying what to set
    calls.clear()
    os.environ.pop("JAX_LOCAL_DEVICE_IDS")
    os.environ.pop("CUDA_VISIBLE_DEVICES")
    sharding.maybe_initialize_distributed()
    assert calls == [{}] and "JAX_LOCAL_DEVICE_IDS" in caplog.text
    # a single task is not a multi-process run
    calls.clear()
    env(SLURM_NTASKS="1", SLURM_STEP_NUM_NODES="1")
    assert sharding.maybe_initialize_distributed() is False and calls == []


def test_jax_slurm_detection_keeps_the_ids_passed(env):
    """What the installed JAX's SLURM detection fills in: coordinator, process count and id from SLURM_*, and the
    local device ids -- [SLURM_LOCALID] when none are passed (why one task per node saw one GPU), the passed ones
    otherwise."""
    from jax._src import clusters

    env(**SLURM_STEP, SLURM_NTASKS="4", SLURM_STEP_NUM_NODES="4")
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    address, count, pid, ids = detect(None, None, None, None, None, 300)
    assert (address.split(":")[0], count, pid, ids) == ("node001", 4, 5, [0])
    assert detect(None, None, None, list(range(8)), None, 300)[1:] == (4, 5, list(range(8)))
