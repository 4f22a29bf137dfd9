import sys

from oodcore.cli.main import main

sys.exit(main())
