"""Evaluate a trained side network from the cache (rank classification for T5), with the
frozen-features baseline beside it; writes metrics.json, predictions.csv and a confusion plot.

    python -m stages.evaluate --run runs/side --cache data/cache --split test
"""
import click

from pipeline.config import EvalConfig, build, click_options
from stages._cli import params_option, user_errors


@click.command(help=__doc__)
@params_option
@click_options(EvalConfig, "evaluate")
@user_errors
def main(params_file, **flags):
    from pipeline import (
        evaluate,  # heavy (torch, transformers): only when running, so --help is instant
    )

    cfg = build(EvalConfig, params_file, "evaluate", **flags)
    metrics = evaluate.run(cfg)
    click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    main()
