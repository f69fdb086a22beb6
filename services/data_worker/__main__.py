"""`python -m services.data_worker` = `ncp worker --queues data` (extra arguments pass through)."""

import sys

from services.cli.main import main

sys.exit(main(["worker", "--queues", "data", *sys.argv[1:]]))
