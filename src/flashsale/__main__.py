from __future__ import annotations

from flashsale.cli import main

main()
