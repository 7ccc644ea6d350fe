"""The absl command-line jobs over a user's task: fit the eigenspace, project the training set into a
store once, score any query set against it (scripts/). The contract: `default_config()` and `Task`."""

from influence_jax.jobs.config import default_config
from influence_jax.types import Task

__all__ = ["Task", "default_config"]
