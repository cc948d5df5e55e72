"""``python -m hostqueue.worker``: a worker process (started by the supervisor)."""

import sys

from hostqueue.worker.main import main

if __name__ == "__main__":
    sys.exit(main())
