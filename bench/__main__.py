"""``python -m bench`` from a clone: the same as ``denser bench`` (the runner is ``denser.bench``)."""

from denser.bench import main

raise SystemExit(main())
