import sys

from affjax.cli import main

sys.exit(main())
