"""Exact cosine top-k over a small `embeddings` table held in RAM: one matrix product per batch
of queries, for banks whose vectors fit comfortably in memory.

Why: at inference every swap point searches with the whole batch's queries at once (96 for
bench/decode.py's prompt + swap). LanceDB answers those in ~0.1-0.2 s per run through its index
(per-query graph walks, then its own result assembly); the demo bank's 18,218 x 256 float32
vectors are 18 MB, and a (96 x 256) @ (256 x 18,218) product plus a partial sort is ~10 ms, and
exact. Large banks (the paper's 1.1e8 references) keep LanceDB's ANN index: `load` refuses a
table above `max_bytes`.

Results are `storage.vectors.search`'s: [[(ref_id, cosine similarity), ...], ...], best first,
scores recomputed in float64 from the stored vectors as `search` does, so both paths report the
same similarity for the same reference (the ranking itself is taken on float32 products: two
references within float32 rounding of each other may come out in either order, as they may from
LanceDB). The matrix is a snapshot of the table when loaded: rows written later are not seen
(the retriever holding it is per process; a rebuild publishes a new bank version anyway).
"""

from __future__ import annotations

import numpy as np
import torch

from storage.vectors import ID_COLUMN, VECTOR_COLUMN, _as_queries, vector_dim

# Default cap on the float32 matrix: past ~1 GiB the load time (a full table scan at startup)
# and the RAM it pins outweigh the per-query saving, and ANN indexes are what such banks have.
DEFAULT_MAX_BYTES = 1 << 30


class VectorMatrix:
    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.ids = np.asarray(ids, dtype=object)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        # one copy of the vectors (the cap is on it); the product is scaled by 1/norm instead
        # (a zero row scores 0)
        self.inv_norms = (1.0 / np.where(self.norms > 0, self.norms, 1.0)).astype(np.float32)
        self.raw = vectors
        self.dim = vectors.shape[1] if vectors.ndim == 2 else 0

    @staticmethod
    def nbytes(table) -> int:
        return table.count_rows() * vector_dim(table) * 4

    @classmethod
    def load(cls, table, max_bytes: int = DEFAULT_MAX_BYTES) -> "VectorMatrix | None":
        """The table's vectors in RAM, or None when they would take more than max_bytes."""
        if cls.nbytes(table) > max_bytes:
            return None
        dim = vector_dim(table)
        t = table.to_lance().to_table(columns=[ID_COLUMN, VECTOR_COLUMN])
        vec = t.column(VECTOR_COLUMN).combine_chunks()
        vectors = vec.flatten().to_numpy().reshape(len(vec), dim) if len(vec) else np.zeros((0, dim), np.float32)
        return cls(np.asarray(t.column(ID_COLUMN).to_pylist(), dtype=object), vectors)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_vectors: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k references for each query vector, best first (as `storage.vectors.search`)."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = _as_queries(query_vectors, self.dim)
        if len(q) == 0:
            return []
        k = min(k, len(self.ids))
        if k == 0:
            return [[] for _ in range(len(q))]
        sims = q @ self.raw.T
        sims *= self.inv_norms
        # torch's top-k: a third of numpy's argpartition on 96 x 18k (8 vs 23 ms of CPU)
        top = torch.topk(torch.from_numpy(sims), k, dim=1, sorted=False).indices.numpy()
        # exact scores of the winners, as `search` computes them (float64, stored vectors)
        exact = np.einsum("qkd,qd->qk", self.raw[top].astype(np.float64), q.astype(np.float64))
        exact /= np.where(self.norms[top] > 0, self.norms[top], 1.0)
        order = np.argsort(-exact, axis=1, kind="stable")
        top, exact = np.take_along_axis(top, order, 1), np.take_along_axis(exact, order, 1)
        ids = self.ids[top]
        return [[(str(r), float(s)) for r, s in zip(ir, sr)] for ir, sr in zip(ids, exact)]
