"""Shared pytest fixtures. Fixture families live in their own modules."""

import os

from fixtures_moto import *  # noqa: F403
from fixtures_slurm import *  # noqa: F403
from fixtures_slurm2 import *  # noqa: F403
from fixtures_tiny import *  # noqa: F403
from hypothesis import settings
from skip_guard import *  # noqa: F403

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default dev). `ci` draws the same examples on every run, so a
# failure in CI is a failure every time and reproduces locally with HYPOTHESIS_PROFILE=ci; `dev` keeps hypothesis's
# defaults (fresh examples each run). Settings a test passes to @settings still win over the profile.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
