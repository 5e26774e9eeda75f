"""Shared fixtures: offline env, seeding, the scene world, the embedded model, tiny random models."""

from __future__ import annotations

import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def world():
    from dleaf_analysis.scenes import World

    return World.load()


@pytest.fixture(scope="session")
def embedded():
    """The shipped embedded model (loaded once per session)."""
    from dleaf_analysis.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def dev_split(world):
    from dleaf_analysis.scenes import load_split

    return load_split("dev", world, limit=16)


@pytest.fixture(scope="session")
def hooked(embedded):
    """A private copy of the embedded model with the hook point installed (tests may edit it)."""
    import copy

    from dleaf_analysis import hooks
    from dleaf_analysis.models.loading import LoadedModel

    model = copy.deepcopy(embedded.model)
    hooks.install(model)
    return LoadedModel(model, embedded.processor, embedded.path, embedded.model_id, embedded.weights_hash)
