"""``python -m peftlab``: the same as the ``peftlab`` command."""
import sys

from .cli import main

sys.exit(main())
