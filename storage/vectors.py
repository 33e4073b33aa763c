"""Vector search over a bank's `embeddings` table (LanceDB 0.40): cosine top-k, an ANN index past
a size threshold, and recall of that index against exact search.

Vectors are L2-normalized by the embedder, so cosine similarity = dot product and LanceDB's cosine
distance is `1 - similarity`; every score returned here is the similarity (higher = closer).

Why a threshold (numbers: BENCHMARKS.md, Retrieval, 2 contended cores, 384-d MiniLM vectors):
LanceDB's exact flat scan costs ~1.5 us per row per single query (4 ms at 2k rows, 16 ms at 11.4k,
83 ms at 45k) while an index answers in ~3-9 ms at every size measured. Below a few thousand rows
the two are equal and an index would only add a build (6-20 s at 11k rows), a second copy of the
vectors and some recall loss. At the default threshold of 10 000 rows the flat scan is ~3x slower
than the index and growing linearly, so the demo bank (11.4k references) gets an index; the
paper's bank (1.1e8) is far past it.

Index: IVF_HNSW_SQ by default (a graph over 8-bit scalar-quantized vectors, cosine): on the FOLDOC
bank it measured recall@5 0.99 at 3-7 ms per single query, against IVF_PQ's 0.96-0.97 at 7-9 ms
(at 45k rows 0.996 vs 0.988, and a 10 s vs 85 s build). IVF_PQ (48 bytes per 384-d vector
instead of ~400 + graph) is there for banks where index size matters more; it is searched with a
refine step that re-ranks 10*k PQ candidates by their exact vectors, without which its recall@5
is ~0.74. The paper's retriever is "FAISS" with an unstated index type (paper §3.1).

`Bank.write` replaces a table, and with it the index: call `build_index` after every write. Rows
appended after a build are still found (LanceDB flat-scans what the index does not cover), so an
index is never stale, only slower until rebuilt. A commit that keeps the index (a Lance Update:
deletion vectors on the old fragments, new fragments for the new rows) is brought up to date by
`update_index`: a delta index over the new fragments only, or a whole build where its policy says
(read the comment above `MAX_DELTA_INDICES`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from model.errors import M3Error

VECTOR_COLUMN = "vector"
ID_COLUMN = "ref_id"
DEFAULT_INDEX_THRESHOLD = 10_000


class VectorIndexError(M3Error, RuntimeError):
    pass


INDEX_TYPES = ("IVF_HNSW_SQ", "IVF_PQ")
DEFAULT_INDEX_TYPE = "IVF_HNSW_SQ"


@dataclass(frozen=True)
class AnnParams:
    """How the index is built and searched; recorded with the table's lineage by the caller."""

    index_type: str
    num_partitions: int
    nprobes: int
    num_sub_vectors: int = 0  # IVF_PQ only
    refine_factor: int = 0  # IVF_PQ only: re-rank refine_factor * k candidates exactly
    ef: int = 0  # IVF_HNSW_SQ only: graph candidates per query
    distance_type: str = "cosine"

    @classmethod
    def for_table(cls, n_rows: int, dim: int, index_type: str = DEFAULT_INDEX_TYPE) -> "AnnParams":
        if index_type not in INDEX_TYPES:
            raise VectorIndexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        n_rows = max(int(n_rows), 1)
        if index_type == "IVF_HNSW_SQ":
            # a graph per partition: partitions only split the work once a single graph gets
            # large (~1M rows); ef well above k because the SQ distances are approximate
            parts = max(1, n_rows // 1_000_000)
            return cls(index_type, num_partitions=parts, nprobes=min(parts, max(1, parts // 8)), ef=64)
        # ~sqrt(n) partitions, the usual IVF balance between choosing partitions (~#parts) and
        # scanning them (~n/#parts), and >= 256 rows each so k-means has points per centroid
        parts = max(1, min(int(math.sqrt(n_rows)), n_rows // 256))
        # 8 dimensions per PQ sub-vector (SIMD-friendly, twice LanceDB's default d/16
        # resolution): 48 bytes per 384-d vector instead of 1536
        sub = dim // 8 if dim % 8 == 0 else (dim // 16 if dim % 16 == 0 else 1)
        # probe 1/16 of the partitions, at least 16; measured on the FOLDOC bank (11.4k refs,
        # 44 partitions, with the re-rank): nprobes 8 -> recall@5 0.94, 16 -> 0.97, 24 -> 0.99
        nprobes = min(parts, max(16, parts // 16))
        return cls(index_type, num_partitions=parts, nprobes=nprobes, num_sub_vectors=max(1, sub), refine_factor=10)

    def index_config(self):
        from lancedb.index import IvfHnswSq, IvfPq

        if self.index_type == "IVF_HNSW_SQ":
            return IvfHnswSq(distance_type=self.distance_type, num_partitions=self.num_partitions)
        return IvfPq(
            distance_type=self.distance_type, num_partitions=self.num_partitions, num_sub_vectors=self.num_sub_vectors
        )

    def apply(self, builder):
        """Set this index's search knobs on a LanceDB vector query."""
        builder = builder.nprobes(self.nprobes)
        if self.refine_factor:
            builder = builder.refine_factor(self.refine_factor)
        if self.ef:
            builder = builder.ef(self.ef)
        return builder


def vector_dim(table) -> int:
    t = table.schema.field(VECTOR_COLUMN).type
    if not pa.types.is_fixed_size_list(t):
        raise VectorIndexError(f"column {VECTOR_COLUMN!r} is {t}, not a fixed_size_list: not searchable")
    return t.list_size


def index_info(table) -> dict | None:
    """{"index_type", "indexed_rows", "unindexed_rows"} of the table's vector index, or None."""
    for idx in table.list_indices():
        if VECTOR_COLUMN in idx.columns:
            st = table.index_stats(idx.name)
            return {
                "name": idx.name,
                "index_type": st.index_type,
                "indexed_rows": st.num_indexed_rows,
                "unindexed_rows": st.num_unindexed_rows,
            }
    return None


def has_index(table) -> bool:
    return index_info(table) is not None


def build_index(
    table,
    n_rows: int | None = None,
    threshold: int = DEFAULT_INDEX_THRESHOLD,
    params: AnnParams | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
) -> dict:
    """Build (or replace) the ANN index if the table has at least `threshold` rows.

    Returns what was done, for the job's report and lineage: {"index": None, "reason": ...}
    below the threshold (exact search it is), else {"index": index_type, **params}. Below the
    threshold an index left by an earlier, larger build is dropped, so that searches are exact
    as the size says they should be.
    """
    n_rows = table.count_rows() if n_rows is None else int(n_rows)
    dim = vector_dim(table)
    if n_rows < threshold:
        info = index_info(table)
        if info:
            table.drop_index(info["name"])
        return {
            "index": None,
            "rows": n_rows,
            "threshold": threshold,
            "reason": f"{n_rows} rows < threshold {threshold}: exact (flat) search, no index",
        }
    params = params or AnnParams.for_table(n_rows, dim, index_type)
    if params.index_type == "IVF_PQ" and n_rows < 256:
        # PQ codebooks have 256 centroids per sub-vector: fewer rows cannot train them
        raise VectorIndexError(f"an IVF_PQ index needs at least 256 rows to train; the table has {n_rows}")
    table.create_index(VECTOR_COLUMN, replace=True, config=params.index_config())
    return {"index": params.index_type, "rows": n_rows, "threshold": threshold, **asdict(params)}


# Incremental updates (issue 26). A commit that keeps the index (lance.LanceOperation.Update)
# leaves the old fragments indexed, deleted rows masked by deletion vectors, and the new fragments
# unindexed (flat-scanned at query time). `update_index` then indexes only those fragments, as a
# delta index (optimize_indices with num_indices_to_merge=0): new rows are assigned to the
# existing IVF centroids, quantized with the existing SQ bounds / PQ codebook, and a small HNSW
# graph is built over them alone; the old index's files are left as they are and the new
# manifest names them again, so kept versions share them. Measured at 100k random 256-d unit
# vectors in the one-thread child (jobs/stages/embed.py), 2 cores shared with other work: the full
# build 103 s of CPU (565 s wall), the delta after replacing 1 % of the rows 2.2-2.6 s of CPU for
# the whole child, its imports included (2.4-2.7 s wall for the update itself): 2-2.5 %; three
# kept versions (a build and two 1 % deltas) 1.02x the bytes of one. A search then asks every
# delta and merges.
#
# The index is built whole instead when a delta would make it worse than a build:
#   - there is no index, or its type, metric or partition count is not what AnnParams.for_table
#     wants for the table now (IVF_HNSW_SQ: one partition per 1M rows, exact; IVF_PQ's ~sqrt(n)
#     moves with every size, so only a drift past MAX_PARTITION_DRIFT retrains): deltas reuse the
#     old centroids, so they can never change the partitioning;
#   - more than MAX_DELTA_INDICES deltas: every query searches every delta (one more graph walk
#     and merge each), so latency grows with their count; a bound turns many small updates into
#     a periodic full build;
#   - the rows in deltas exceed MAX_DELTA_FRACTION of the live rows: many separate small graphs
#     answer worse than one, the old SQ bounds / centroids were fit to other data, and the delta
#     build already costs a sizeable fraction of a full one;
#   - the rows deleted since their segment was built exceed MAX_DEAD_FRACTION of what the index
#     holds: they are still nodes of the graph, walked and then filtered, and still bytes.
# A 1 % edit is far from every bound (one delta of ~1 %, ~1 % dead), so routine rebuilds are
# incremental and a full build comes back after about MAX_DELTA_INDICES of them.
MAX_DELTA_INDICES = 8
MAX_DELTA_FRACTION = 0.25
MAX_DEAD_FRACTION = 0.2
MAX_PARTITION_DRIFT = 1.5  # IVF_PQ: wanted / built partitions (or the inverse) past this retrains


def index_segments(table) -> list[dict]:
    """The vector index's segments (the base build first, then its deltas) as Lance reports them:
    [{"uuid", "rows" (stored in it, deleted ones too), "num_partitions", "metric"}]; [] if none."""
    info = index_info(table)
    if info is None:
        return []
    st = table.to_lance().stats.index_stats(info["name"])
    return [
        {
            "uuid": seg["uuid"],
            "rows": sum(p["size"] for p in seg.get("partitions", ())),
            "num_partitions": seg.get("num_partitions"),
            "metric": seg.get("metric_type"),
        }
        for seg in st.get("indices", ())
    ]


def update_plan(table, n_rows: int, params: AnnParams) -> dict:
    """Whether `update_index` extends the table's index by a delta ("incremental") or builds it
    whole ("full"), with the reason and the figures it was decided on."""
    info = index_info(table)
    if info is None:
        return {"update": "full", "reason": "no index"}
    if info["index_type"] != params.index_type:
        return {"update": "full", "reason": f"the index is {info['index_type']}, {params.index_type} wanted"}
    segs = index_segments(table)
    if not segs:
        return {"update": "full", "reason": "the index has no segments Lance can describe"}
    if any(s["metric"] != params.distance_type for s in segs):
        return {"update": "full", "reason": f"the index's metric is not {params.distance_type}"}
    built = segs[0]["num_partitions"] or 0
    want = params.num_partitions
    drift = max(want, built) / max(min(want, built), 1)
    if (built != want) if params.index_type == "IVF_HNSW_SQ" else drift > MAX_PARTITION_DRIFT:
        return {"update": "full", "reason": f"the index has {built} partitions, {want} wanted for {n_rows:,} rows"}
    unindexed = int(info["unindexed_rows"])
    stored = sum(s["rows"] for s in segs)
    dead = max(0, stored - int(info["indexed_rows"]))
    deltas = len(segs) - 1 + (1 if unindexed else 0)
    delta_rows = stored - segs[0]["rows"] + unindexed
    figures = {"unindexed_rows": unindexed, "deleted_rows": dead, "deltas": deltas, "delta_rows": delta_rows}
    if deltas > MAX_DELTA_INDICES:
        return {"update": "full", "reason": f"{deltas} delta indices > {MAX_DELTA_INDICES}", **figures}
    if delta_rows > MAX_DELTA_FRACTION * max(n_rows, 1):
        return {
            "update": "full",
            "reason": f"{delta_rows:,} rows in deltas > {MAX_DELTA_FRACTION:.0%} of {n_rows:,}",
            **figures,
        }
    if dead > MAX_DEAD_FRACTION * max(stored, 1):
        return {
            "update": "full",
            "reason": f"{dead:,} deleted rows > {MAX_DEAD_FRACTION:.0%} of the index's {stored:,}",
            **figures,
        }
    return {"update": "incremental", "reason": f"{unindexed:,} new rows as a delta", **figures}


def update_index(
    table,
    n_rows: int | None = None,
    threshold: int = DEFAULT_INDEX_THRESHOLD,
    params: AnnParams | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
) -> dict:
    """Bring the table's ANN index up to date after a commit: a delta index over the unindexed
    fragments where `update_plan` allows, else `build_index` (which also handles the threshold).

    Returns `build_index`'s report with "update" ("incremental" | "full"), "indexed_rows" (rows
    this call indexed: the new ones, or all) and "reason". An incremental update with nothing
    unindexed (a commit that only deleted rows) commits nothing.
    """
    t0 = time.perf_counter()
    n_rows = table.count_rows() if n_rows is None else int(n_rows)
    if n_rows < threshold:
        return {**build_index(table, n_rows, threshold=threshold), "update": "full", "indexed_rows": 0}
    params = params or AnnParams.for_table(n_rows, vector_dim(table), index_type)
    plan = update_plan(table, n_rows, params)
    if plan["update"] == "full":
        out = build_index(table, n_rows, threshold=threshold, params=params)
        return {**out, **plan, "indexed_rows": n_rows, "seconds": round(time.perf_counter() - t0, 3)}
    if plan["unindexed_rows"]:
        name = index_info(table)["name"]
        # 0 indices to merge: always a new delta over the unindexed fragments only; merging would
        # fold them into an existing segment and write that segment again (its bytes no longer
        # shared with the versions before, its graph rebuilt)
        table.to_lance().optimize.optimize_indices(num_indices_to_merge=0, index_names=[name])
        table.checkout_latest()
        left = index_info(table)["unindexed_rows"]
        if left:
            raise VectorIndexError(f"the incremental index update left {left} rows unindexed")
    return {
        "index": params.index_type,
        "rows": n_rows,
        "threshold": threshold,
        **asdict(params),
        **plan,
        "indexed_rows": plan["unindexed_rows"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def search_params(table) -> AnnParams | None:
    """The search knobs for the table's index as built by `build_index` with default params."""
    info = index_info(table)
    if info is None:
        return None
    return AnnParams.for_table(info["indexed_rows"], vector_dim(table), info["index_type"])


def _as_queries(query_vectors: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors have shape {q.shape}; the table's vectors have dim {dim}")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    # cosine needs no normalization, but the numpy paths use dot products: keep them equal
    return np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)


def search(
    table, query_vectors: np.ndarray, k: int = 5, exact: bool = False, params: AnnParams | None = None
) -> list[list[tuple[str, float]]]:
    """Top-k references for each query vector: [[(ref_id, cosine similarity), ...], ...].

    exact=True bypasses any index (LanceDB flat scan: ground truth). exact=False uses the index
    if the table has one (with `params`' nprobes/refine/ef; by default `search_params(table)`,
    the knobs `build_index` chose for its size: ~0.4 ms of index metadata per call, so a loop of
    single queries should look them up once and pass them) and is exact when it has none.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    dim = vector_dim(table)
    q = _as_queries(query_vectors, dim)
    if len(q) == 0:
        return []
    builder = table.search(q, vector_column_name=VECTOR_COLUMN).distance_type("cosine").limit(k)
    # the vectors come back too: scores are recomputed exactly below, because an index's
    # `_distance` is its own metric (IVF_HNSW_SQ reports squared L2 of quantized vectors)
    builder = builder.select([ID_COLUMN, "_distance", VECTOR_COLUMN])
    if exact:
        builder = builder.bypass_vector_index()
    else:
        params = params or search_params(table)
        if params is not None:
            builder = params.apply(builder)
    res = builder.to_arrow()
    out: list[list[tuple[str, float]]] = [[] for _ in range(len(q))]
    qidx = res.column("query_index").to_numpy() if "query_index" in res.column_names else np.zeros(res.num_rows, int)
    ids = res.column(ID_COLUMN).to_pylist()
    vecs = res.column(VECTOR_COLUMN).combine_chunks()
    vecs = vecs.flatten().to_numpy().reshape(len(vecs), dim).astype(np.float64)
    norms = np.linalg.norm(vecs, axis=1)
    sims = np.einsum("nd,nd->n", vecs, q[qidx].astype(np.float64)) / np.where(norms > 0, norms, 1.0)
    for qi, rid, s in zip(qidx, ids, sims):
        out[qi].append((rid, float(s)))
    for hits in out:  # LanceDB orders within a query already; make it a contract
        hits.sort(key=lambda h: -h[1])
    return out


def exact_topk(
    table,
    query_vectors: np.ndarray,
    k: int = 5,
    batch_rows: int = 65_536,
) -> tuple[list[list[tuple[str, float]]], np.ndarray]:
    """Brute force in numpy, streaming the table in batches (memory stays ~batch_rows * dim):
    the ground truth that does not share code with LanceDB's search. Returns the hits and each
    query's k-th best similarity."""
    dim = vector_dim(table)
    q = _as_queries(query_vectors, dim)
    nq = len(q)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_id = np.empty((nq, 0), dtype=object)
    for batch in _scan(table, batch_rows):
        ids, vecs = batch
        s = q @ vecs.T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_id = np.concatenate([best_id, np.broadcast_to(ids, (nq, len(ids)))], axis=1)
        keep = min(k, cand_s.shape[1])
        top = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]
        best_s = np.take_along_axis(cand_s, top, axis=1)
        best_id = np.take_along_axis(cand_id, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_id = np.take_along_axis(best_id, order, axis=1)
    hits = [[(str(r), float(s)) for r, s in zip(ids, ss)] for ids, ss in zip(best_id, best_s)]
    kth = best_s[:, -1] if best_s.shape[1] else np.full(nq, -np.inf, dtype=np.float32)
    return hits, kth


def recall_at_k(table, queries: np.ndarray, k: int = 5, params: AnnParams | None = None) -> float:
    """Fraction of the exact top-k that the ANN search (`search(exact=False)`) returns.

    Ties count as hits: references with identical text have identical vectors, and which of two
    equal neighbours a search returns is arbitrary, so an ANN hit whose exact similarity reaches
    the k-th exact similarity is correct even if its id differs from the exact list's.
    """
    q = _as_queries(queries, vector_dim(table))
    if len(q) == 0:
        raise ValueError("recall_at_k needs at least one query")
    truth, kth = exact_topk(table, q, k)
    ann = search(table, q, k=k, exact=False, params=params)
    want = {(qi, rid) for qi, hits in enumerate(ann) for rid, _ in hits}
    exact_sim = _similarities(table, q, want)
    found = 0
    for qi, hits in enumerate(ann):
        ok = {rid for rid, _ in hits if exact_sim.get((qi, rid), -np.inf) >= kth[qi] - 1e-5}
        found += min(len(ok), len(truth[qi]))
    return found / sum(len(t) for t in truth)


def _similarities(table, q: np.ndarray, pairs: set[tuple[int, str]]) -> dict[tuple[int, str], float]:
    """Exact cosine of the given (query index, ref_id) pairs, from the stored vectors."""
    by_id: dict[str, list[int]] = {}
    for qi, rid in pairs:
        by_id.setdefault(rid, []).append(qi)
    out: dict[tuple[int, str], float] = {}
    for ids, vecs in _scan(table):
        for row, rid in enumerate(ids):
            for qi in by_id.get(rid, ()):
                out[(qi, rid)] = float(q[qi] @ vecs[row])
    return out


def _scan(table, batch_rows: int = 65_536):
    """(ref_ids ndarray[object], vectors (n, dim) float32) per batch of the table."""
    ds = table.to_lance()
    dim = vector_dim(table)
    for rb in ds.to_batches(columns=[ID_COLUMN, VECTOR_COLUMN], batch_size=batch_rows):
        vec = rb.column(VECTOR_COLUMN)
        yield (np.asarray(rb.column(ID_COLUMN).to_pylist(), dtype=object), vec.flatten().to_numpy().reshape(-1, dim))
