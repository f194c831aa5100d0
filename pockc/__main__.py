import sys

from pockc.cli import main

sys.exit(main())
