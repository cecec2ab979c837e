"""`python -m fastdqn ...`: the `fastdqn` command where no console script is installed."""

from fastdqn.cli import run

run()
