from hypothesis import settings

# "ci" (default) replays the same examples on every run, so CI cannot flake;
# HYPOTHESIS_PROFILE=stress explores far more, randomly, when hunting bugs.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None)
settings.register_profile("stress", max_examples=5000, deadline=None)
import os  # noqa: E402

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
