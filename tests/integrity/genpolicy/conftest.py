"""Fixtures of the genpolicy tests: images pushed to the session's docker-registry."""

from __future__ import annotations

import pytest

from tests.conftest import Registry
from tests.integrity.genpolicy.helpers import Images


@pytest.fixture(scope="session")
def images(open_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(open_registry, tmp_path_factory.mktemp("gp-images"))
