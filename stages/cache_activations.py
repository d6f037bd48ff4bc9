"""Stage one: run the frozen backbone once per split and write the ladder stores.

    python -m stages.cache_activations --task rt-sentiment --limit 500 --out data/cache
"""
import click

from pipeline.config import CacheConfig, build, click_options
from stages._cli import params_option, user_errors


@click.command(help=__doc__)
@params_option
@click_options(CacheConfig, "cache_activations")
@user_errors
def main(params_file, **flags):
    from pipeline import (
        cache_activations,  # heavy (torch, transformers): only when running, so --help is instant
    )

    cfg = build(CacheConfig, params_file, "cache_activations", **flags)
    for path in cache_activations.run(cfg, log=click.echo):
        click.echo(str(path))


if __name__ == "__main__":
    main()
