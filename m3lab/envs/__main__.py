import sys

from m3lab.envs import main

sys.exit(main())
