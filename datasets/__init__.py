"""Built-in data set plugins; importing this package registers them."""

from ltbench.datasets import digits_lt  # noqa: F401
