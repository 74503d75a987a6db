"""Fixtures for the Kubernetes checks: every kustomize variant, rendered once."""

from __future__ import annotations

import pytest

from tests.k8s.render import render_all


@pytest.fixture(scope="session")
def renders() -> dict[str, list[dict]]:
    return render_all()
