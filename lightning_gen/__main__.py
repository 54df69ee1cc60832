import sys

from lightning_gen.cli import main

if __name__ == "__main__":
    sys.exit(main())
