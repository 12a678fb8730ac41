"""`python -m qwen2` is the `qwen2` command."""

import sys

from qwen2.cli import main

sys.exit(main())
