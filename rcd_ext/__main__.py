import sys

from rcd_ext.cli import main

sys.exit(main())
