"""Hypothesis profiles for ``pytest proofs`` run on its own.

tests/conftest.py registers the project's profiles and loads one, but pytest loads
it only when it collects tests/. So that the proofs behave the same when run alone,
register the same profiles here if nobody has (keep the two in step), and load one
unless a profile was already chosen. Each proof sets its own number of examples.
"""

import os

from hypothesis import settings
from hypothesis.errors import InvalidArgument

for name, derandomize, examples in (("ci", True, 30), ("dev", False, 200)):
    try:
        settings.get_profile(name)
    except InvalidArgument:
        settings.register_profile(name, derandomize=derandomize, max_examples=examples,
                                  deadline=None, print_blob=True)
if settings.get_current_profile_name() == "default":
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
