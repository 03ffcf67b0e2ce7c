"""The ``textinv`` command.  Thin: every subcommand calls the library and prints the result.

Errors a user can cause (:class:`~textinv.errors.TextinvError`) print as one line and exit 2.
"""
from __future__ import annotations

import sys

import click

from .errors import TextinvError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TextinvError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="textinv")
def main():
    """textinv — Textual Inversion: train, store, convert and use embedding files."""


def _register_world():
    try:
        from .world.cli import world
    except ImportError:
        return
    main.add_command(world)


_register_world()
