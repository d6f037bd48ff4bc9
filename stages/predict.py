"""Predict with the backbone + trained side network on raw text; JSONL out, one record per input line.

Input: a UTF-8 text file (one example per line; a tab separates the two texts of a pair task) or '-' for
stdin. Output, one JSON line per input line: {"text", "label", "label_index", "probabilities": {name: p}}
for classification, {"text", "prediction"} for regression; --raw-scores adds "scores".

    echo "a gorgeous, witty film" | python -m stages.predict --run runs/side -
"""
import sys
from pathlib import Path

import click

from pipeline.durable import atomic_path, check_writable, write_failure
from pipeline.errors import ConfigError, DataError
from stages._cli import user_errors


@click.command(help=__doc__)
@click.argument("input", default="-")
@click.option("--run", default="runs/side", show_default=True,
              help="Folder written by train_side (a sweep's --out holds its best config).")
@click.option("--out", default="-", help="JSONL output file, written whole or not at all (default: stdout).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Texts per backbone + side-net forward.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda.")
@click.option("--raw-scores", is_flag=True, help="Also print the raw scores (class logits or candidate "
                                                 "log-likelihoods) behind the probabilities.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int,
              help="Generation tasks: stop after this many tokens (or at the end token).")
@user_errors
def main(input, run, out, batch_size, device, raw_scores, max_new_tokens):
    from pipeline.predict import (  # heavy (torch, transformers): not for --help
        LSTModel,
        read_inputs,
    )

    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if input == "-":
        texts = read_inputs(sys.stdin.buffer, "stdin")
    else:
        if not Path(input).is_file():
            raise DataError(f"{input}: input file does not exist")
        with open(input, "rb") as fh:
            texts = read_inputs(fh, input)
    if out != "-":
        check_writable(out)
    model = LSTModel(run, device)
    model.check_inputs(texts, "stdin" if input == "-" else input)
    rows = model.predict(texts, batch_size, raw_scores, max_new_tokens)
    if out == "-":
        for row in rows:
            click.echo(row)
    elif Path(out).exists() and not Path(out).is_file():  # a device or a pipe: no temporary sibling there
        try:
            with open(out, "w") as fh:
                for row in rows:
                    fh.write(row + "\n")
        except OSError as e:
            raise write_failure(Path(out), e) from e
    else:
        with atomic_path(out) as tmp, open(tmp, "w") as fh:
            for row in rows:
                fh.write(row + "\n")


if __name__ == "__main__":
    main()
