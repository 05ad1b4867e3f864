import sys

from pyvl.cli import main

sys.exit(main())
