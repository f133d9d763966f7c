"""``python -m deepwatch`` (and ``torchrun -m deepwatch train ...``): the ``deepwatch`` command."""

import sys

from .cli import main

sys.exit(main())
