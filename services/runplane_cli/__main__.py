"""``python -m runplane_cli``: the ``runplane`` command."""

from runplane_cli.main import main

main()
