"""``python -m weightcache.vllm MODEL [...]``: the ``weightcache-vllm`` command."""

import sys

from ._launcher import main

sys.exit(main())
