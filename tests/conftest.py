"""Shared fixtures (session-scoped where they are expensive): offline env, seeding, the scene world,
the embedded model, a hooked copy of it, the tiny sub-word LLaVA-1.5 directory and the committed
fake COCO.  Tests are tiered by directory: ``unit/`` (no model: pure functions, hand
computations, published numbers), ``integration/`` (models, commands, studies end to end),
``acceptance/`` (the shipped model's checks and the main job); each tier is also a marker
(``pytest -m unit``)."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from dleaf_analysis.paths import EXAMPLES_DIR

TESTS = Path(__file__).resolve().parent
FAKE_COCO = EXAMPLES_DIR / "fake_coco"
REFERENCE_CAPTIONS = TESTS / "data" / "reference_captions"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier in ("unit", "integration", "acceptance"):
            item.add_marker(getattr(pytest.mark, tier))


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
def dev_source(dev_split):
    from dleaf_analysis.sources import SceneSource

    return SceneSource(dev_split)


@pytest.fixture(scope="session")
def hooked(embedded):
    """A private copy of the embedded model with the hook point installed (tests may edit it)."""
    import copy

    from dleaf_analysis import hooks
    from dleaf_analysis.models.loading import LoadedModel

    model = copy.deepcopy(embedded.model)
    hooks.install(model)
    return LoadedModel(model, embedded.processor, embedded.path, embedded.model_id, embedded.weights_hash,
                       embedded.files_hash)


@pytest.fixture(scope="session")
def subword_dir(tmp_path_factory):
    """The tiny sub-word LLaVA-1.5 model directory (trained for seconds to mention COCO objects)."""
    from dleaf_analysis.models.tiny import tiny_llava15_subword_dir

    return tiny_llava15_subword_dir(tmp_path_factory.mktemp("m") / "llava-1.5-subword")


@pytest.fixture(scope="session")
def subword(subword_dir):
    from dleaf_analysis.models.loading import load_model

    return load_model(subword_dir)


@pytest.fixture(scope="session")
def fake_coco():
    from dleaf_analysis.sources import CocoSource

    return CocoSource(FAKE_COCO / "val2014", FAKE_COCO / "instances_fake2014.json", image_ids=FAKE_COCO / "image_ids.txt")


@pytest.fixture(scope="session")
def coco_args():
    return ["--coco-images", str(FAKE_COCO / "val2014"), "--coco-annotations", str(FAKE_COCO / "instances_fake2014.json")]
