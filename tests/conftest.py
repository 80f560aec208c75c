"""Shared pytest fixtures. Fixture families live in their own modules."""

from fixtures_slurm import *  # noqa: F403
from fixtures_tiny import *  # noqa: F403
from skip_guard import *  # noqa: F403
