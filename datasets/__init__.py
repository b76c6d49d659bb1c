"""Built-in data set plugins; importing this package registers them with ``ltbench.data.DATASETS``."""

from ltbench.datasets import digits_lt  # noqa: F401
