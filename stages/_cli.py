"""Shared CLI plumbing: one clear message and exit code 2 for errors a user can act on."""
from __future__ import annotations

import functools
import sys

import click

from pipeline.errors import LadderCacheError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LadderCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # full disk, unwritable folder: name the file
            click.echo(f"error: {e.strerror or e} ({e.filename or 'output'}); check free space and permissions", err=True)
            sys.exit(2)

    return wrapper


params_option = click.option("--params", "params_file", default="params.yaml", show_default=True,
                             help="YAML file whose section for this stage gives the defaults.")
