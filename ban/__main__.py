import sys

from ban.cli import main

sys.exit(main())
