"""`python -m fastdqn ...`: the `fastdqn` command where no console script is installed."""

import sys

from fastdqn.cli import main

sys.exit(main())
