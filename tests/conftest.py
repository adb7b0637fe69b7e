"""Shared fixtures of the test suite."""

from tests.postgres_fixture import *  # noqa: F403
