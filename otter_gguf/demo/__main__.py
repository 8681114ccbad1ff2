import sys

from otter_gguf.demo.run import main

sys.exit(main())
