"""Shared fixtures: tiny random diffusers models with the real checkpoints' topologies.

They are written with ``save_pretrained`` and loaded back through ``load_backbone``: the same
code path a real checkpoint takes (like diffusers' own ``get_dummy_components``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffseg_utils import load_backbone
from diffseg_utils.topologies import write_ddpm_like, write_sd_like

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sd_tiny_dir(tmp_path_factory) -> Path:
    return write_sd_like(tmp_path_factory.mktemp("sd_tiny"), tiny=True, seed=0)


@pytest.fixture(scope="session")
def ddpm_tiny_dir(tmp_path_factory) -> Path:
    return write_ddpm_like(tmp_path_factory.mktemp("ddpm_tiny"), tiny=True, seed=0)


@pytest.fixture(scope="session")
def sd_tiny(sd_tiny_dir):
    return load_backbone(str(sd_tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def ddpm_tiny(ddpm_tiny_dir):
    return load_backbone(str(ddpm_tiny_dir), device="cpu")

