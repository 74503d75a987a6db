"""Fixtures the browser and CLI tests share with the playground API tests."""

from tests.integration.test_playground_api import playground_stack  # noqa: F401 - re-exported as a fixture
