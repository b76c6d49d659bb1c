"""Built-in data set plugins; importing this package registers them."""

from ltbench.datasets import cifar_lt, digits_lt, list_lt  # noqa: F401
