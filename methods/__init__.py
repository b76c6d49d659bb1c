"""Built-in method plugins; importing this package registers them."""

from ltbench.methods import (  # noqa: F401
    ce,
    crt,
    drw,
    ldam,
    lws,
    nbn,
    reweighting,
    sampling,
    tau_norm,
)
