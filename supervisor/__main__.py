import sys

from agentpen.supervisor.cli import main

sys.exit(main())
