"""Side-network init from the backbone (paper sec. 3.3): magnitude, empirical Fisher or random.
Fisher back-propagates through the backbone, so run this where the backbone fits (big GPU).

    python -m stages.prune_init --init fisher --fisher-samples 256 --out data/side_init.safetensors
"""
import click

from pipeline.config import PruneConfig, build, click_options
from stages._cli import params_option, user_errors


@click.command(help=__doc__)
@params_option
@click_options(PruneConfig, "prune_init")
@user_errors
def main(params_file, **flags):
    from pipeline import (
        prune_init,  # heavy (torch, transformers): only when running, so --help is instant
    )

    cfg = build(PruneConfig, params_file, "prune_init", **flags)
    click.echo(prune_init.run(cfg, log=click.echo))


if __name__ == "__main__":
    main()
