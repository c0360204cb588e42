"""The ``broker`` command (its console script and ``python -m broker``).

Light on purpose: ``broker serve`` takes SIGHUP from here on (:mod:`broker._early`), before
the CLI's imports (about 0.7 s), during which SIGHUP's default action would end it."""

import sys

from broker import _early


def main() -> None:
    """Run the ``broker`` command with this process's arguments."""
    if sys.argv[1:2] == ["serve"]:
        _early.hold_sighup()
    from broker.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
