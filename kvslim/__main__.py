"""``python -m kvslim`` runs the same CLI as the ``kvslim`` command."""

import sys

from kvslim.cli import main

sys.exit(main())
