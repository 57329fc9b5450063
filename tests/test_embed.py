"""Sentence embeddings as a Ray Data stage (the bundled MiniLM), the centroid rule and near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from tapir_ray.embed import centroids, embed, max_similarity, nearest_centroid


def test_centroid_score_is_the_mean_inner_product_with_the_members():
    members = {"a": np.array([[1.0, 0.0], [0.6, 0.8]]), "b": np.array([[0.0, 1.0]])}
    q = np.array([[0.8, 0.6]])
    cents = centroids(np.vstack([members["a"], members["b"]]), ["a", "a", "b"])
    for (
        label,
        rows,
    ) in members.items():  # <q, μ_c> == mean_i <q, x_i>: (0.8 + 0.96) / 2 = 0.88 for a
        assert np.isclose(float(q[0] @ cents[label]), float(np.mean(rows @ q[0])))
    assert np.isclose(float(q[0] @ cents["a"]), 0.88)
    assert nearest_centroid(q, cents) == ["a"]
    assert nearest_centroid(np.array([[0.1, 0.99]]), cents) == ["b"]


def test_minilm_embeddings_classify_by_centroid_and_find_near_duplicates(ray_cluster):
    texts = [
        "Solve 3x + 5 = 20 for x.", "What is the derivative of x^2?", "Compute 17 times 23.",
        "Give me a recipe for pancakes.", "How do I bake sourdough bread?", "What goes into a good omelette?",
    ]  # fmt: skip
    labels = ["math"] * 3 + ["cooking"] * 3
    rows = ray.data.from_items([{"id": str(i), "text": t} for i, t in enumerate(texts)])
    out = sorted(embed(rows, "bundled:all-minilm-l6-v2").take_all(), key=lambda r: int(r["id"]))
    vecs = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in out])
    assert vecs.shape == (6, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    # Without the text (as a run writes its pool's embeddings): the same vectors, no text column.
    bare = sorted(embed(rows, "bundled:all-minilm-l6-v2", drop_text=True).take_all(),
                  key=lambda r: int(r["id"]))  # fmt: skip
    assert all(set(r) == {"id", "embedding"} for r in bare)
    assert np.allclose(np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in bare]), vecs)
    cents = centroids(vecs, labels)
    from tapir_ray.embed import encode, load_encoder

    encoder = load_encoder("bundled:all-minilm-l6-v2")
    assert np.abs(encode(encoder, texts) - vecs).max() < 1e-4  # the encoder's own vectors
    queries = encode(encoder, ["Integrate sin(x) from 0 to pi.", "How long should I boil pasta?",
                               "Solve 3x + 5 = 20 for the value of x."])  # fmt: skip
    assert nearest_centroid(queries[:2], cents) == ["math", "cooking"]
    best = max_similarity(queries, ray.data.from_items([{"embedding": v} for v in vecs]))
    assert best[2] > 0.9 > best[0]  # a reworded pool row is a near-duplicate; a new question is not


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_embedding_columns_become_matrices_without_python_floats(ray_cluster):
    import pyarrow as pa

    from tapir_ray.embed import as_matrix

    vecs = _unit(np.random.default_rng(0), 5)
    lists = pa.array(list(vecs), type=pa.list_(pa.float32()))
    chunked = pa.chunked_array([lists[:2], lists[2:]])
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 8)
    tensor = ray.data.from_items([{"e": v} for v in vecs]).to_arrow_refs()
    from_ray = pa.concat_tables(ray.get(tensor))["e"]  # Ray's tensor extension column
    for column in (lists, chunked, fixed, from_ray, np.array(list(vecs) + [], dtype=object)):
        assert np.array_equal(as_matrix(column), vecs), type(column)
    assert as_matrix(pa.array([], type=pa.list_(pa.float32()))).shape[0] == 0
    with pytest.raises(ValueError, match="1 rows have no embedding"):
        as_matrix(pa.array([list(vecs[0]), None], type=pa.list_(pa.float32())))


def test_near_duplicate_checks_over_blocks_equal_the_pair_by_pair_rule(ray_cluster, monkeypatch):
    """Blocks of 7 rows (so every path crosses block edges) give what comparing every pair gives:
    the best match in a dataset, and the greedy in-order keep rule against earlier kept rows."""
    from tapir_ray import embed as E

    monkeypatch.setattr(E, "BLOCK", 7)
    rng = np.random.default_rng(3)
    base = _unit(rng, 12, 4)
    # Near-copies of earlier rows, so that some rows must be rejected.
    noisy = base[rng.integers(0, 12, 30)] + rng.normal(scale=0.05, size=(30, 4)).astype(np.float32)
    vecs = np.vstack([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    prior = _unit(rng, 3, 4)
    threshold = 0.95

    def by_pairs(earlier: list[np.ndarray]) -> list[bool]:
        kept, out = list(earlier), []
        for v in vecs:
            out.append(all(float(v @ k) < threshold for k in kept))
            if out[-1]:
                kept.append(v)
        return out

    expected = by_pairs(list(prior))
    assert E.greedy_distinct(vecs, prior, threshold).tolist() == expected
    assert 0 < sum(expected) < len(vecs)
    assert E.greedy_distinct(vecs, None, threshold).tolist() == by_pairs([])

    rows = _unit(rng, 40, 4)
    ds = ray.data.from_items([{"embedding": v} for v in rows], override_num_blocks=3)
    assert np.allclose(E.max_similarity(vecs, ds), (vecs @ rows.T).max(axis=1), atol=1e-6)


GPU_CLUSTER = """
import json, threading, time
import numpy as np, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
from tapir_ray.runtime import configure_data
configure_data()
from tapir_ray.embed import embed
MODEL = "bundled:all-minilm-l6-v2"
texts = [f"question {i} about topic {i % 7}" for i in range(300)]
out, vectors = {}, {}
for gpus in (0, 1):
    ds = ray.data.from_items([{"id": str(i), "text": t} for i, t in enumerate(texts)])
    low, stop = [1.0], threading.Event()
    def watch():
        while not stop.is_set():
            low[0] = min(low[0], ray.available_resources().get("GPU", 0.0))
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    rows = sorted(embed(ds, MODEL, gpus=gpus).take_all(), key=lambda r: int(r["id"]))
    stop.set()
    watcher.join()
    vectors[gpus] = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    out[gpus] = {"gpu_free_low": low[0], "rows": len(rows)}
out["max_diff"] = float(np.abs(vectors[1] - vectors[0]).max())
print("RESULT " + json.dumps(out))
"""


def test_a_cluster_with_gpus_embeds_on_gpu_actors(asset_cache):
    """With GPUs in the cluster the embedding stage runs on encoder actors that hold a share of a
    GPU each; without, on CPU tasks that hold none. Both give the same vectors (the CPU tasks',
    the encoder's own: test_minilm_embeddings_...). (The cluster here declares a GPU with no CUDA
    device behind it: the actor encodes on CPU.)"""
    import json
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    proc = subprocess.run([sys.executable, "-c", GPU_CLUSTER], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    from tapir_ray.embed import EMBED_GPU_SHARE

    assert out["1"]["rows"] == out["0"]["rows"] == 300
    assert out["1"]["gpu_free_low"] == pytest.approx(1 - EMBED_GPU_SHARE)  # one actor, its share
    assert out["0"]["gpu_free_low"] == 1.0
    assert out["max_diff"] < 1e-4
