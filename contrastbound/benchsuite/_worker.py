"""Entry point of the fresh process that measures one configuration: ``python -m contrastbound.benchsuite._worker
'<json spec>'``; prints one line ``BENCH-RESULT {...}``."""

import sys

from .harness import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
