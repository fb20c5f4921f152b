"""The adversarial suites run real servers with the integration tests' fixtures."""

from tests.integration.conftest import harness, model_dirs, start_server  # noqa: F401 - fixtures
