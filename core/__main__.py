"""``python -m proxim`` runs the command line (and ``accelerate launch -m proxim train`` works)."""

from proxim.cli import main

raise SystemExit(main())
