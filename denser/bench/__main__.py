"""``python -m denser.bench``: the same as ``denser bench``."""

from denser.bench import main

raise SystemExit(main())
