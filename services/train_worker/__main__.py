"""`python -m services.train_worker` = `ncp worker --queues train`: one training task at a time,
on the GPUs in NCP_GPUS (the trainer itself is `python -m services.train_worker.entry`)."""

import sys

from services.cli.main import main

sys.exit(main(["worker", "--queues", "train", *sys.argv[1:]]))
