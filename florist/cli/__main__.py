import sys

from florist.cli import main

sys.exit(main())
