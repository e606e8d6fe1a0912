"""`python -m host_broker ...` is `ivshmem-broker ...`."""

import sys

from host_broker.cli import main

sys.exit(main())
