"""Built-in method plugins; importing this package registers them."""

from ltbench.methods import ce, nbn  # noqa: F401
