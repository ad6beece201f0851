"""`python -m benchmarks NAME [flags]`: run one benchmark (`--list` names them)."""

import sys

from benchmarks import main

sys.exit(main(sys.argv[1:]))
