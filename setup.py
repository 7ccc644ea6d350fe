"""Install influence_jax: `pip install -e .` (tests: `pip install -e .[test]`)."""

from setuptools import find_packages, setup

setup(
    name="influence_jax",
    version="0.1.0",
    description=(
        "Influence functions in JAX/Flax: Arnoldi eigenspaces, generalized "
        "influence, classification influence and memorization."
    ),
    packages=find_packages(include=["influence_jax", "influence_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "jaxlib>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "absl-py>=2.0",
        "ml_collections>=0.1.1",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "scipy>=1.10",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3"]},
)
