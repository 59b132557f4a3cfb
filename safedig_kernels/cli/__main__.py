"""`python -m safedig_kernels.cli`, as torchrun runs `safedig train`."""
import sys

from . import main

sys.exit(main())
