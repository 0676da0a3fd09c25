from __future__ import annotations

from nodemesh.cli import main

raise SystemExit(main())
