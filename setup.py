"""Install influence_jax.

`pip install -e .` installs the core library; extras: `jobs` (absl command-line jobs, grain
input, reports), `examples` (example data sets, models, training loops, evaluation harness),
`test` (everything, plus pytest).
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "jaxlib>=0.7",
    "flax>=0.10",
    "orbax-checkpoint>=0.11",
    "numpy>=1.26",
]
EXAMPLES = ["optax>=0.2", "scikit-learn>=1.3", "scipy>=1.10"]
JOBS = ["absl-py>=2.0", "ml_collections>=0.1.1", "matplotlib>=3.7", "grain>=0.2.10", "optax>=0.2"]

setup(
    name="influence_jax",
    version="0.1.0",
    description=(
        "Influence functions in JAX/Flax: Arnoldi eigenspaces, generalized "
        "influence, classification influence and memorization."
    ),
    packages=find_packages(include=["influence_jax", "influence_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "jobs": JOBS,
        "examples": EXAMPLES,
        "test": sorted(set(JOBS + EXAMPLES)) + ["pytest>=8", "pytest-xdist>=3", "filelock>=3"],
    },
)
