import sys

from bench.loss_core import main

sys.exit(main())
