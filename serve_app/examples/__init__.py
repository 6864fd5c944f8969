"""The example deployment, shipped with the package so the installed CLI finds it from any directory.

``fleet.yaml`` is the example fleet (four GPU pools) and ``production.yaml`` the imageserve config
served on it; ``imageserve cluster-configs`` makes serve_config.yaml and the cluster configs in
cluster/deploy/ from the two.
"""

from pathlib import Path

EXAMPLE_FLEET = Path(__file__).with_name("fleet.yaml")
EXAMPLE_PRODUCTION_CONFIG = Path(__file__).with_name("production.yaml")
