import os

from hypothesis import settings

# Hypothesis profiles for the property tests: "default" for every run, "slow"
# for a long search (TF_MOE_HYPOTHESIS_PROFILE=slow).
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("slow", max_examples=10000, deadline=None)
settings.load_profile(os.environ.get("TF_MOE_HYPOTHESIS_PROFILE", "default"))
