import sys

from ouro.cli import main

sys.exit(main())
