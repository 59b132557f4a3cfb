"""`python -m safedig_kernels.bench ARGS`: the same as `safedig bench ARGS`."""
import sys

from .commands import main

sys.exit(main())
