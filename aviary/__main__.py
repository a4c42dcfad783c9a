import sys

from aviary.cli import main

sys.exit(main())
