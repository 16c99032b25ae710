import sys

from overlayd.cli import main

sys.exit(main())
