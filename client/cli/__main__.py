"""`python -m latentd.client.cli`, which is what `accelerate launch -m` runs."""

import sys

from . import main

sys.exit(main())
