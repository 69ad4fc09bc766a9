import sys

from pyegress.cli import main

sys.exit(main())
