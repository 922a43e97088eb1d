"""GPU machines without a GPU: the install's CUDA detection, the reference-kernel note, and
each dask worker's GPU, all through their seams (ACTCACHE_CUDA, ACTCACHE_GPU_COUNT)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harvest import gpu
from harvest import run as hr

ROOT = Path(__file__).resolve().parents[2]


def make(*args, **env):
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args, f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_make_install_adds_the_fast_kernels_only_where_cuda_is_detected():
    on = make("gpu-kernels", "PIP_GPU=echo pip-install", ACTCACHE_CUDA="1")
    assert on.returncode == 0 and "pip-install flash-linear-attention causal-conv1d" in on.stdout, on
    off = make("gpu-kernels", "PIP_GPU=echo pip-install", ACTCACHE_CUDA="0")
    assert off.returncode == 0 and "pip-install" not in off.stdout and "not installed" in off.stdout, off
    dry = make("-n", "-W", "pyproject.toml", "install", ACTCACHE_CUDA="1")
    assert "gpu-kernels" in dry.stdout  # the install recipe runs the detection step
    failing = make("gpu-kernels", "PIP_GPU=false", ACTCACHE_CUDA="1")  # a kernel that cannot build
    assert failing.returncode == 0 and "could not install" in failing.stdout, failing
    for value, want in (("1", "cuda"), ("0", "cpu")):
        out = subprocess.run(
            [sys.executable, "-m", "harvest.gpu", "detect"],
            capture_output=True,
            text=True,
            env={**os.environ, "ACTCACHE_CUDA": value},
        )
        assert out.stdout.strip() == want


def test_harvest_names_the_reference_kernels_in_one_line_on_a_gpu_only():
    from harvest.config import ModelConfig
    from harvest.model import load_model

    lm = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu"))
    assert gpu.reference_kernel_note(lm.model, "cpu") is None
    note = gpu.reference_kernel_note(lm.model, "cuda:1")
    if all(importlib.util.find_spec(m) for m in gpu.FAST_KERNELS):
        assert note is None
    else:
        assert "\n" not in note and "6 Gated DeltaNet layers" in note and "cuda:1" in note and "make install" in note


def test_worker_slots_count_per_host_whatever_the_names():
    workers = {
        "tcp://10.0.0.1:4001": {"host": "10.0.0.1", "name": "trainer-b"},
        "tcp://10.0.0.1:4000": {"host": "10.0.0.1", "name": "trainer-a"},
        "tcp://10.0.0.2:4000": {"host": "10.0.0.2", "name": "trainer-c"},
    }
    assert gpu.worker_slots(workers) == {"tcp://10.0.0.1:4000": 0, "tcp://10.0.0.1:4001": 1, "tcp://10.0.0.2:4000": 0}


@pytest.mark.slow
def test_dask_workers_with_names_that_are_not_numbers_get_distinct_gpus(monkeypatch):
    from dask.distributed import Client, Scheduler, SpecCluster, Worker

    monkeypatch.setenv("ACTCACHE_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = {name: {"cls": Worker, "options": {"nthreads": 1}} for name in ("gpu-node-b", "gpu-node-a")}
    with (
        SpecCluster(
            workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, asynchronous=False
        ) as cluster,
        Client(cluster) as client,
    ):
        pinned = hr.pin_worker_devices(client)
        assert sorted(pinned.values()) == ["cuda:0", "cuda:1"]
        assert client.run(lambda dask_worker: dask_worker.actcache_device) == pinned
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a launcher gave each worker its own GPU
        assert set(hr.pin_worker_devices(client).values()) == {"cuda:0"}
    monkeypatch.setenv("ACTCACHE_GPU_COUNT", "0")
    assert gpu.device_for(1) is None
