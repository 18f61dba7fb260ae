"""``python -m minivlm`` (and ``torchrun -m minivlm``) run the command line."""
import sys

from minivlm.cli import main

sys.exit(main())
