"""``python -m fast3d.cli``: the `fast3d` command (DeepSpeed's launcher starts ranks this way)."""

import sys

from fast3d.cli import main

sys.exit(main())
