"""`python -m services.eval_worker` = `ncp worker --queues eval` (extra arguments pass through)."""

import sys

from services.cli.main import main

sys.exit(main(["worker", "--queues", "eval", *sys.argv[1:]]))
