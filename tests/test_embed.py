"""Sentence embeddings as a Ray Data stage (the bundled MiniLM), the centroid rule and near-duplicates."""

from __future__ import annotations

import numpy as np
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
    cents = centroids(vecs, labels)
    from tapir_ray.embed import encode, load_encoder

    encoder = load_encoder("bundled:all-minilm-l6-v2")
    queries = encode(encoder, ["Integrate sin(x) from 0 to pi.", "How long should I boil pasta?",
                               "Solve 3x + 5 = 20 for the value of x."])  # fmt: skip
    assert nearest_centroid(queries[:2], cents) == ["math", "cooking"]
    best = max_similarity(queries, ray.data.from_items([{"embedding": v} for v in vecs]))
    assert best[2] > 0.9 > best[0]  # a reworded pool row is a near-duplicate; a new question is not
