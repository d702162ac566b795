"""``python -m proxim`` runs the command line (and ``accelerate launch -m proxim train`` works).

The guard matters: vLLM's multiprocessing mode spawns workers that re-import the main module.
"""

from proxim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
