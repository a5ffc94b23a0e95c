"""`python -m medsr_monai` is the `medsr` command."""

import sys

from medsr_monai.cli import main

sys.exit(main())
