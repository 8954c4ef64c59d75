import sys

from care_q.cli import main

sys.exit(main())
