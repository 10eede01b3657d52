"""Shared test configuration.

Hypothesis runs under a fixed profile in CI (``HYPOTHESIS_PROFILE=ci``):
derandomized, no deadline, failure blobs printed, so a failure in CI replays
exactly on any machine.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
