"""Hypothesis profiles for ``pytest proofs`` run on its own.

tests/conftest.py loads the project's profiles, but pytest reads it only when it
collects tests/; the same call here makes the proofs behave the same when run alone
("ci" derandomized by default, HYPOTHESIS_PROFILE=dev for fresh examples). Each proof
sets its own number of examples.
"""

from dla_backends.testing import load_hypothesis_profile

load_hypothesis_profile()
