"""`python -m minitriton {demo,eval,calibrate}`: see `minitriton.cli`."""

from .cli import main

raise SystemExit(main())
