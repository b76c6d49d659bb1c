"""ltbench: a benchmark leaderboard harness for long-tailed image recognition."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ltbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
