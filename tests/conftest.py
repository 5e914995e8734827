import os

# Tests run on the CPU; a GPU visible to the test process would change numerics and timings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
