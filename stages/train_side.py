"""Stage two: train the side network from the ladder store (or --feed backbone, in-loop LST).

    python -m stages.train_side --cache data/cache --out runs/side --epochs 3
"""
import click

from pipeline.config import TrainConfig, build, click_options
from stages._cli import params_option, user_errors


@click.command(help=__doc__)
@params_option
@click_options(TrainConfig, "train_side")
@user_errors
def main(params_file, **flags):
    from pipeline import (
        train_side,  # heavy (torch, transformers): only when running, so --help is instant
    )

    cfg = build(TrainConfig, params_file, "train_side", **flags)
    metrics = train_side.train(cfg, log=click.echo)
    click.echo(" ".join(f"{k}={v}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    main()
