import sys

from .quant_core.cli import main

sys.exit(main())
