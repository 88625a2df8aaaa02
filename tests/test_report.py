"""The report's config hash names the experiment, not where it was written; a CUDA run names its GPU."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from kprune_cli.core.report import config_hash, run_identity, versions


def test_config_hash_ignores_the_output_directory_but_not_the_experiment():
    base = {"rate": 0.5, "seed": 0, "task": {"name": "mrpc"}, "output_dir": "a", "overwrite": False}
    moved = {**base, "output_dir": "b", "overwrite": True}
    other_rate = {**base, "rate": 0.6}

    assert config_hash(OmegaConf.create(base)) == config_hash(OmegaConf.create(moved))
    assert config_hash(OmegaConf.create(base)) != config_hash(OmegaConf.create(other_rate))


def test_a_cuda_run_records_the_gpu_model_in_versions_and_resume_identity(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake 80GB")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert versions(cuda)["gpu"] == "NVIDIA Fake 80GB" and versions(cuda)["cudnn"] == "90100"
    assert "gpu" not in versions(cpu)
    cfg = OmegaConf.create({"rate": 0.5, "output_dir": "x"})
    assert run_identity(cfg, cuda)["gpu"] == "NVIDIA Fake 80GB"
    assert "gpu" not in run_identity(cfg, cpu)
