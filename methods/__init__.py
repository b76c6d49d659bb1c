"""Built-in method plugins; importing this package registers them."""

from ltbench.methods import ce  # noqa: F401
