"""``python -m plait.cli`` runs the ``plait`` command."""

from plait.cli.main import main

main()
