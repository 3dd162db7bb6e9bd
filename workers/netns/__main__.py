import sys

from agentpen.workers.netns.main import main

sys.exit(main(sys.argv[1:]))
