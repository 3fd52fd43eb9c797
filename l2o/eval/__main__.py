"""``python -m l2o.eval``: the same command as ``python -m l2o.evaluate``."""
import sys

from .cli import main

sys.exit(main())
