"""`python -m selfsup.train ...` is `selfsup train ...`."""

import sys

from selfsup import cli

sys.exit(cli.main(["train", *sys.argv[1:]]))
