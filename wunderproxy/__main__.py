"""``python -m wunderproxy`` is the ``wunderproxy`` command."""

from wunderproxy.cli import main

main()
