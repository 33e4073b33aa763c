"""`ray start` for the nodes of the test cluster, all on loopback.

Ray allows one node per machine on loopback (single-machine mode,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: nothing resolves 127.0.0.1 to the machine's routable
address); in that mode `ray start --address` refuses to add a node. The test cluster wants both:
several nodes, none reachable from outside. So this process (only the `ray start` CLI) lifts the
refusal and keeps 127.0.0.1 as given; the processes it starts inherit single-machine mode from the
environment. Real machines need none of this: plain `ray start` (docs/cluster.md, "On a cluster").
"""

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402 - after the two switches above

sys.exit(main())
