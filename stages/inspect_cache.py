"""Summarize a ladder store lazily with dask: fingerprint, per-layer shape, bytes on disk vs raw,
compression, mean/std/max-abs, outlier channels, and (with --reference) a lossy codec's error.
With --verify, only check the store: every file hashed against the record stage one wrote.

    python -m stages.inspect_cache data/cache/train.zarr
    python -m stages.inspect_cache --verify data/cache/train.zarr
"""
import json

import click

from stages._cli import user_errors


@click.command(help=__doc__)
@click.argument("path")
@click.option("--reference", default=None, help="Lossless store of the same examples: report relative error.")
@click.option("--top-k", default=5, show_default=True, help="Outlier channels to list per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--verify", is_flag=True, help="Hash every file against the store's record (full integrity check).")
@user_errors
def main(path, reference, top_k, as_json, verify):
    from pipeline.inspect_cache import summarize  # zarr, dask: not for --help
    from pipeline.ladder_store import LadderStore

    if verify:
        files, nbytes, seconds = LadderStore(path).verify()
        click.echo(f"{path}: ok, {files} files, {nbytes / 2**20:.1f} MiB hashed in {seconds:.2f} s "
                   f"({seconds / max(nbytes / 2**30, 1e-9):.2f} s/GiB)")
        return
    s = summarize(path, top_k, reference)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    fp = s["fingerprint"]
    click.echo(f"{s['path']}: {s['examples']} examples, {s['tokens']} tokens")
    for k in ("backbone", "task", "split", "max_length", "layers", "dtype", "codec", "content_hash", "format_version"):
        click.echo(f"  {k}: {fp.get(k)}")
    click.echo(f"{'state':10} {'shape':>16} {'MiB disk':>9} {'x vs fp16':>9} {'B/token':>8} {'mean':>8} {'std':>8} "
               f"{'max|x|':>8}  outlier channels" + ("  rel.err" if reference else ""))
    for name, r in s["layers"].items():
        outl = ",".join(str(c) for c in r["outlier_channels"])
        err = f"  {r['relative_error_vs_reference']:.4f}" if "relative_error_vs_reference" in r else ""
        click.echo(f"{name:10} {str(tuple(r['shape'])):>16} {r['bytes_on_disk'] / 2**20:9.2f} "
                   f"{r['compression_vs_fp16']:9.2f} {r['bytes_per_token']:8.1f} {r['mean']:8.3f} {r['std']:8.3f} "
                   f"{r['max_abs']:8.2f}  {outl}{err}")


if __name__ == "__main__":
    main()
