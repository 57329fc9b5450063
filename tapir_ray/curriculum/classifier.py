"""TAPIR's task classifier: the oracle's labels, read back, and the embedding classifier that
extends an oracle-labelled sample to the pool (class centroids from per-block sums; every other
row takes its nearest centroid's label; a held-out part of the sample measures agreement)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames
from tapir_ray.curriculum.plan import in_fraction
from tapir_ray.embed import as_matrix
from tapir_ray.oracle import prompts as P
from tapir_ray.rundir import RunDir


class LabelParser:
    def __init__(self, labels: list[str]):
        self.labels = labels

    def __call__(self, text: str) -> str:
        return P.parse_label(text, self.labels)


def _oracle_labels(batch: pa.Table) -> pa.Table:
    labels = [json.loads(p) for p in batch["parsed"].to_pylist()]
    return pa.table({"id": batch["id"], "label": pa.array(labels, pa.string())})


def labels_from_parsed(answers_dir: str, out_dir: str) -> None:
    ds = frames.read(answers_dir, ["id", "parsed"]).map_batches(
        _oracle_labels, batch_format="pyarrow"
    )
    frames.write(ds.rename_columns({"label": "category"}), out_dir,
                 pa.schema([("id", pa.string()), ("category", pa.string())]))  # fmt: skip


def _fit_holdout(batch: pa.Table, seed: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """Which labelled rows fit the centroids and which measure them."""
    test = np.array([in_fraction(seed, "classifier-holdout", i, holdout) for i in batch["id"].to_pylist()], bool)  # fmt: skip
    labelled = pc.is_valid(batch["label"]).to_numpy(zero_copy_only=False)
    return labelled & ~test, labelled & test


def _class_sums(batch: pa.Table, seed: int, holdout: float) -> dict[str, Any]:
    fit, test = _fit_holdout(batch, seed, holdout)
    vecs, labels = as_matrix(batch["embedding"]), batch["label"].to_pylist()
    sums: dict[str, list] = {}
    for k in np.flatnonzero(fit):
        s = sums.setdefault(labels[k], [np.zeros(vecs.shape[1], np.float64), 0])
        s[0] += vecs[k]
        s[1] += 1
    return {"sums": sums, "fit": int(fit.sum()), "test": int(test.sum())}


def _nearest(
    batch: pa.Table, names: list[str], matrix: np.ndarray, seed: int, holdout: float
) -> pa.Table:
    """Each row's category: its oracle label where it has one, else the nearest centroid's."""
    _, test = _fit_holdout(batch, seed, holdout)
    vecs, labels = as_matrix(batch["embedding"]), batch["label"].to_pylist()
    predicted = [names[k] for k in (vecs @ matrix.T).argmax(axis=1)] if len(vecs) else []
    return pa.table({
        "id": batch["id"],
        "category": pa.array([lab if lab is not None else p for lab, p in zip(labels, predicted, strict=True)], pa.string()),
        "agree": pa.array([bool(t) and p == lab for t, p, lab in zip(test, predicted, labels, strict=True)], pa.bool_()),
    })  # fmt: skip


def embedding_classifier(run_dir: str, holdout: float, seed: int) -> dict[str, Any]:
    """Centroids from the oracle-labelled sample (sums per class, block by block); the held-out
    part measures agreement with the oracle; every other pool row gets its nearest centroid's
    label (μ_c is the class mean, not re-normalised: <e(q), μ_c> is the mean inner product with
    the members)."""
    run = RunDir(run_dir)
    emb_dir, labels_dir = run.embeddings, run.labels
    n, sample = frames.rows(emb_dir), frames.rows(run.labels_oracle)
    oracle = frames.read(run.labels_oracle, ["id", "parsed"])
    oracle = oracle.map_batches(_oracle_labels, batch_format="pyarrow")

    def rows() -> ray.data.Dataset:
        """Every pool row's embedding with its oracle label (null outside the sample): the
        sample (label_sample rows) goes to each block of embeddings, which are read twice
        rather than kept (1,000,000 × 384 float32 is 1.5 GB of the object store)."""
        return frames.join(frames.read(emb_dir, ["id", "embedding"]), oracle, "left_outer",
                           size=n, right_rows=sample)  # fmt: skip

    sums: dict[str, list] = {}
    fit = test = 0
    for part in frames.fold(rows(), _class_sums, seed=seed, holdout=holdout):
        fit, test = fit + part["fit"], test + part["test"]
        for label, (v, k) in part["sums"].items():
            s = sums.setdefault(label, [0.0, 0])
            s[0], s[1] = s[0] + v, s[1] + k
    names = sorted(sums)
    matrix = np.stack([sums[c][0] / sums[c][1] for c in names]).astype(np.float32)
    out = rows().map_batches(
        _nearest, fn_args=(names, matrix, seed, holdout), batch_format="pyarrow"
    )
    frames.write(
        out,
        labels_dir,
        pa.schema([("id", pa.string()), ("category", pa.string()), ("agree", pa.bool_())]),
    )
    agree = sum(
        frames.fold(
            frames.read(labels_dir, ["agree"], {"agree": pa.bool_()}),
            lambda b: int(pc.sum(b["agree"]).as_py() or 0),
        )
    )
    return {"oracle_labelled": frames.rows(run.labels_oracle), "classifier_fit_rows": fit,
            "classifier_holdout_rows": test, "classifier_agreement": round(agree / test, 4) if test else None}  # fmt: skip
