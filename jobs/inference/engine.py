"""One model, three ways to give it knowledge, same weights: explicit memory, none, RAG.

`Inference(cfg)` loads the checkpoint (infer.checkpoint, else the continual-stage model, else
the model the memories were encoded with), the bank's tokenizer and, when a mode needs them,
the embedder and the memory store. The memory store refuses a bank written by another model,
naming both hashes, so memory mode can never read memories another model wrote.

Prompt conventions (what the model saw in training): a prompt starts a new document, so it is
encoded behind eos_id (packed training sequences separate documents with EOS, no BOS). RAG
prepends each retrieved reference followed by eos_id, as separate documents.

Batches: rows of a batch share one KV cache length and chunk grid, so a batch groups contexts
of equal token length in every mode (a prompt then generates the same tokens alone or batched).
The model takes no padding mask, and a left pad would be attended and shift the row's
positions, so RAG contexts (which differ in length by construction) are never padded either.

`Inference(cfg, build=-1)` (`m3 generate --build`, `m3 eval --build`) serves a published build
other than the live one, resolved as `m3 sql --build` resolves it (storage/builds.py), with the
model that build's memories were written by (jobs/models.py `model_of_build`): rolling knowledge
back is reading an older build, no retraining.

Serving refuses a bank whose sparsity or codec differs from what the model was trained to read
and warns when the model was trained on another memory schedule than serving's (chunk c reads
what chunk c-1 retrieved): `check_trained_reading`. `Inference.control()` loads the
equal-compute control `m3 eval` compares the memory model with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from jobs.config.infer import MODES, InferConfig
from jobs.config.loader import ConfigError
from jobs.models import CONTROL, model_for_serving
from model import load_model
from model.checkpoint import memory_reading, saved_hash
from model.files import WEIGHTS_FILE
from model.generation import ChunkRead, generate_with_memory
from model.sampling import row_generators
from pipelines.tokenizer import load as load_tokenizer
from storage.bank import Bank, BankError
from storage.builds import reader_bank, resolve_build
from storage.layout import LayoutError

# the schedule generation and `m3 eval` serve memories on (model/generation.py)
SERVED_SCHEDULE = "serving"


def bank_tokenizer(bank: Bank):
    """The tokenizer the bank's references were cut with (its lineage names the file)."""
    tok_rel = bank.metadata("refs").get("tokenizer_path")
    if not tok_rel:
        raise BankError("the refs table records no tokenizer_path in its lineage: rerun `m3 ingest`")
    return load_tokenizer(bank.layout.path(tok_rel))


def bank_retriever(cfg, bank: Bank, tokenizer, per_query: int, device: str = "cpu", infer=None):
    """A BankRetriever with the embedder that wrote the bank's vectors (not whatever the config
    names today: queries from another model's space would retrieve confident nonsense), ranking
    by the config's `retrieval.method`."""
    from jobs.inference.retriever import BankRetriever
    from pipelines.embedder import load_embedder

    ic = infer or cfg.infer
    bank.require("embeddings")
    meta = bank.metadata("embeddings")
    spec = (meta.get("config") or {}).get("retrieval", {}).get("embedder") or cfg.retrieval.embedder
    # the query embedder runs beside the model (a GPU embeds a chunk's queries in ms)
    return BankRetriever(
        bank,
        load_embedder(spec, device=device),
        tokenizer,
        per_query=per_query,
        max_overlap=ic.max_overlap,
        candidates=ic.candidates,
        exact=ic.exact,
        method=cfg.retrieval.method,
    )


def prefetch_pays(device) -> bool:
    """Whether overlapping the next chunk's retrieval with decoding (a thread) can hide it: only
    where the thread has a core of its own. On a GPU the decode leaves the CPU free; on CPU the
    decode's torch threads take every core they are given, and a retrieval thread then only
    contends with them (measured on 2 idle cores, 2 torch threads: 0.76 of no retrieval with the
    thread, 0.81 without; BENCHMARKS.md, decode speed). infer.prefetch true means: when it pays."""
    if torch.device(device).type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def check_trained_reading(trained: dict, memories_meta: dict, allow: bool) -> list[str]:
    """Refuse (or, when allowed, warn about) a bank whose memories differ from what the model
    was trained to read: another sparsity or another codec; warn (never refuse: the memories
    are the same) when it was trained on another retrieval schedule than serving's
    (export.json's memory.schedule, train.memory_schedule). Returns the differences."""
    if not trained.get("reads_memory"):
        return []
    sparsity = memories_meta.get("sparsity") or {}
    served_k = sparsity.get("top_k")
    if served_k is not None and sparsity.get("ref_max_tokens"):
        served_k = min(served_k, sparsity["ref_max_tokens"])  # more than a reference holds = all of it
    diffs = []
    if trained.get("top_k") != served_k:
        diffs.append(f"it was trained to read {trained.get('top_k')} tokens per head, the bank keeps {served_k}")
    if trained.get("codec") is not None and trained["codec"] != memories_meta.get("codec"):
        diffs.append(f"it was trained through codec {trained['codec']}, the bank is {memories_meta.get('codec')}")
    if diffs and not allow:
        raise BankError(
            "the bank's memories are not what this model was trained to read: "
            + "; ".join(diffs)
            + " (re-encode with the matching encode.codec / model.mem_top_k, or set "
            "infer.allow_memory_mismatch: true to serve it anyway)"
        )
    for d in diffs:
        print(f"WARNING: serving memories the model was not trained to read: {d}", flush=True)
    schedule = trained.get("schedule")
    if schedule is not None and schedule != SERVED_SCHEDULE:
        d = (
            f"it was trained on the {schedule!r} memory schedule (train.memory_schedule), and is served on "
            f"{SERVED_SCHEDULE!r}: chunk c reads what chunk c-1 retrieved"
        )
        print(f"WARNING: serving memories on another schedule than the model was trained on: {d}", flush=True)
        diffs.append(d)
    return diffs


@dataclass
class Output:
    prompt_tokens: list[int]
    tokens: list[int]  # the continuation, cut before the first EOS
    text: str
    mode: str
    reads: list[ChunkRead] = field(default_factory=list)  # memory: what each chunk read
    rag_refs: list[str] = field(default_factory=list)  # rag: the prepended references


class Inference:
    def __init__(
        self,
        cfg,
        checkpoint: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        infer: InferConfig | None = None,
        build: str | int | None = None,
    ):
        """build: a published build to serve instead of the live one (its number, `live`, or -1 =
        the one before live: `--build`), with the model its memories were written by."""
        self.cfg, self.ic = cfg, infer or cfg.infer
        bank = Bank.of(cfg)
        # the published build, never one being written; or the build asked for
        self.build = resolve_build(bank, build) if build is not None else None
        self.bank = reader_bank(bank, build)
        self.bank.require("refs")
        self.checkpoint = model_for_serving(cfg, self.bank, checkpoint, build=self.build)
        self.model_hash = saved_hash(self.checkpoint)  # what the memories must have been written by
        self.memory_reading = memory_reading(self.checkpoint)
        self.device = device or self.ic.device
        if dtype is None and self.ic.dtype != "float32":
            dtype = getattr(torch, self.ic.dtype)
        self.dtype = dtype
        self.model = load_model(self.checkpoint, device=self.device, dtype=dtype)
        self.tokenizer = bank_tokenizer(self.bank)
        self._retriever = self._store = self._control = None

    def control(self) -> dict:
        """The equal-compute control: a model trained from the same warmup for the same steps
        without memory, where its training stage exports it (`bank.trained_model("control")`),
        loaded like the served model, once. {"path", "model", "model_hash", "sink", "warnings"},
        or {"path", "missing": why} when there is none to compare with."""
        if self._control is None:
            self._control = self._load_control()
        return self._control

    def _load_control(self) -> dict:
        try:
            path = self.bank.trained_model(CONTROL)
        except LayoutError as e:
            return {"path": None, "missing": str(e)}
        if not (path / WEIGHTS_FILE).exists():
            return {"path": str(path), "missing": f"no model in {path}: the control training stage exports it there"}
        model = load_model(path, device=self.device, dtype=self.dtype)
        mine, theirs = self.model.config, model.config
        for key in ("vocab_size", "eos_id", "pad_id"):
            if getattr(mine, key) != getattr(theirs, key):
                return {
                    "path": str(path),
                    "missing": f"the model in {path} has {key}={getattr(theirs, key)}, "
                    f"the served model {getattr(mine, key)}: not comparable",
                }
        reading, warnings = memory_reading(path), []
        if reading.get("reads_memory"):
            warnings.append(f"the control in {path} was trained to read memories: it is no control")
        started = [_export(p).get("init_model_hash") for p in (self.checkpoint, path)]
        if None not in started and started[0] != started[1]:
            warnings.append(
                f"the control started from warmup model {started[1][:12]}, the served model from "
                f"{started[0][:12]}: not the same warmup"
            )
        for w in warnings:
            print(f"WARNING: {w}", flush=True)
        return {
            "path": str(path),
            "model": model,
            "model_hash": saved_hash(path),
            "sink": bool(reading.get("reads_memory")),
            "warnings": warnings,
        }

    # -- components, built on first use so `none` needs neither embedder nor memories
    def store(self):
        if self._store is None:
            from storage.memory_store import MemoryStore

            self.bank.require("memories")
            store = MemoryStore(
                self.bank, self.model_hash, cache_size=self.ic.cache_size, cache_bytes=self.ic.cache_bytes
            )
            check_trained_reading(self.memory_reading, store.meta, self.ic.allow_memory_mismatch)
            self._store = store
        return self._store

    def retriever(self):
        if self._retriever is None:
            self._retriever = bank_retriever(
                self.cfg, self.bank, self.tokenizer, self.model.config.mems_per_chunk, device=self.device, infer=self.ic
            )
        return self._retriever

    def memory_retriever(self):
        r = self.retriever()
        r.store = self.store()  # checks the lineage: refuses another model's memories
        return r

    # -- generation
    def encode(self, text: str) -> list[int]:
        return [self.model.config.eos_id] + self.tokenizer.encode(text).ids

    def generate(self, prompts: list[str], mode: str | None = None, **kw) -> list[Output]:
        return self.generate_tokens([self.encode(p) for p in prompts], mode, **kw)

    def generate_tokens(
        self,
        prompts: list[list[int]],
        mode: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seeds: list[int] | None = None,
        batch_size: int | None = None,
        stop_at_eos: bool = True,
        prefetch: bool | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Output]:
        """Generate for every prompt; seeds default to infer.seed + the prompt's index, so a
        prompt samples the same tokens whatever batch it lands in.

        on_token(prompt_index, token_id): called for every token of every prompt as soon as its
        decode step has sampled it (in the calling thread), EOS and the tokens a row samples after
        it included (a row decodes on until every row of its batch has stopped): the caller cuts."""
        ic = self.ic
        mode = mode or ic.mode
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        n_new = max_new_tokens or ic.max_new_tokens
        opts = dict(
            temperature=ic.temperature if temperature is None else temperature,
            top_p=ic.top_p if top_p is None else top_p,
            eos_id=self.model.config.eos_id if stop_at_eos else None,
            prefetch=ic.prefetch and prefetch_pays(self.device) if prefetch is None else prefetch,
        )
        seeds = seeds if seeds is not None else [ic.seed + i for i in range(len(prompts))]
        size = batch_size or ic.batch_size
        contexts, rag_ids = list(prompts), [[] for _ in prompts]
        if mode == "rag":
            contexts, rag_ids = self.rag_contexts(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (len(contexts[i]), i))
        groups, cur = [], []
        for i in order:  # equal lengths together: a row is never padded (see the module docstring)
            if cur and (len(cur) == size or len(contexts[i]) != len(contexts[cur[0]])):
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        results: dict[int, Output] = {}
        retrieve = self.memory_retriever() if mode == "memory" else None
        for g in groups:
            batch = self._batch([contexts[i] for i in g], n_new)
            gens = row_generators([seeds[i] for i in g], device=self.device)
            step_cb = None
            if on_token is not None:

                def step_cb(token: torch.Tensor, g=g) -> None:
                    for row, t in enumerate(token[:, 0].tolist()):
                        on_token(g[row], t)

            out = generate_with_memory(
                self.model,
                batch,
                n_new,
                retrieve,
                generators=gens,
                sink=bool(self.memory_reading.get("reads_memory")),
                on_token=step_cb,
                **opts,
            )
            T0 = batch.shape[1]
            for row, i in enumerate(g):
                cont = out.tokens[row, T0:].tolist()
                if stop_at_eos and self.model.config.eos_id in cont:
                    cont = cont[: cont.index(self.model.config.eos_id)]
                results[i] = Output(
                    list(prompts[i]),
                    cont,
                    self.tokenizer.decode(cont),
                    mode,
                    out.reads[row] if out.reads else [],
                    rag_ids[i],
                )
        return [results[i] for i in range(len(prompts))]

    def _batch(self, rows: list[list[int]], n_new: int) -> torch.Tensor:
        width = len(rows[0])
        if any(len(r) != width for r in rows):
            raise ValueError("a batch holds contexts of one length (the model takes no padding mask)")
        limit = self.model.config.max_seq_len
        if width + n_new > limit:
            raise ConfigError(
                f"infer.max_new_tokens: a context of {width} tokens + {n_new} new ones "
                f"exceeds the model's max_seq_len={limit}: shorten the prompt or max_new_tokens"
            )
        return torch.tensor([list(r) for r in rows], dtype=torch.long, device=self.device)

    def rag_contexts(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[str]]]:
        """Each prompt behind the text of the references retrieved once with its last chunk."""
        r = self.retriever()
        cs = self.model.config.mem_chunk_size
        ids = r.search_ids([p[-cs:] for p in prompts], prompts)
        tokens = r.ref_tokens({x for row in ids for x in row})
        eos = self.model.config.eos_id
        ctx = [[t for x in row for t in tokens[x] + [eos]] + list(p) for row, p in zip(ids, prompts)]
        return ctx, ids

    def ref_texts(self, ref_ids) -> dict[str, str]:
        import pyarrow.compute as pc

        ids = sorted(set(ref_ids))
        if not ids:
            return {}
        t = self.bank.dataset("refs").to_table(columns=["ref_id", "text"], filter=pc.field("ref_id").isin(ids))
        return dict(zip(t.column("ref_id").to_pylist(), t.column("text").to_pylist()))


def _export(path) -> dict:
    """A saved model's export.json ({} for a model saved outside training)."""
    export = os.path.join(path, "export.json")
    if not os.path.exists(export):
        return {}
    with open(export, encoding="utf-8") as f:
        return json.load(f)
