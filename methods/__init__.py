"""Built-in method plugins; importing this package registers them with ``ltbench.method.METHODS``."""

from ltbench.methods import ce  # noqa: F401
