import sys

from plm.cli import main

sys.exit(main())
