"""Predict with the backbone + trained side network on raw text; JSONL out.

Input: a text file (one example per line; a tab separates the two texts of a pair task) or '-' for stdin.

    echo "a gorgeous, witty film" | python -m stages.predict --run runs/side -
"""
import sys

import click

from pipeline.predict import LSTModel
from stages._cli import user_errors


@click.command(help=__doc__)
@click.argument("input", type=click.File("r"), default="-")
@click.option("--run", default="runs/side", show_default=True, help="Folder written by train_side.")
@click.option("--out", type=click.File("w"), default="-", help="JSONL output file (default stdout).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@user_errors
def main(input, run, out, batch_size, device):
    texts = []
    for line in input:
        line = line.rstrip("\n")
        if line.strip():
            a, _, b = line.partition("\t")
            texts.append((a, b or None))
    if not texts:
        click.echo("error: no input lines; give a text file with one example per line", err=True)
        sys.exit(2)
    for row in LSTModel(run, device).predict(texts, batch_size):
        out.write(row + "\n")


if __name__ == "__main__":
    main()
