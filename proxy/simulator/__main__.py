"""``python -m proxy.simulator``: the same as ``lmgate-sim``."""

from .cli import main

if __name__ == "__main__":
    main()
