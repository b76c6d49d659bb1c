"""Packaged suite files (YAML); ``ltbench list suites`` shows them."""
