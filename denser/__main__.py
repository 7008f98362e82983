import sys

from denser.cli import main

sys.exit(main())
