"""Loop-based reference implementations, written from the paper's formulas, not from model/.

Everything runs in float64 over Python lists: one vector per token, explicit loops over layers,
tokens, heads and keys, RoPE as an explicit rotation matrix, softmax and the selection score
summed term by term (no log-sum-exp). Only the weights are read from the module.
"""

import math

import torch


def rotation(pos: int, dim: int, theta: float) -> torch.Tensor:
    """RoPE as a matrix: pairs (i, i + dim/2) rotated by pos * theta^(-2i/dim)."""
    half = dim // 2
    r = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(half):
        angle = pos * theta ** (-2 * i / dim)
        c, s = math.cos(angle), math.sin(angle)
        r[i, i], r[i, i + half] = c, -s
        r[i + half, i], r[i + half, i + half] = s, c
    return r


def softmax_attend(query, keys, values, head_dim):
    scores = [float(query @ k) / math.sqrt(head_dim) for k in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, values)) / total


class NaiveModel:
    def __init__(self, model):
        self.cfg = cfg = model.config
        d = lambda t: t.detach().to(torch.float64).clone()  # noqa: E731
        self.emb = d(model.tok_emb.weight)
        self.head = self.emb if model.lm_head is None else d(model.lm_head.weight)
        self.final_norm = d(model.norm.weight)
        self.layers = []
        D, Hq, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        for block in model.blocks:
            w = d(block.attn.wqkv.weight)
            self.layers.append(
                dict(
                    wq=[w[h * D : (h + 1) * D] for h in range(Hq)],
                    wk=[w[(Hq + h) * D : (Hq + h + 1) * D] for h in range(Hkv)],
                    wv=[w[(Hq + Hkv + h) * D : (Hq + Hkv + h + 1) * D] for h in range(Hkv)],
                    wo=d(block.attn.wo.weight),
                    attn_norm=d(block.attn_norm.weight),
                    mlp_norm=d(block.mlp_norm.weight),
                    gate=d(block.mlp.w_gate.weight),
                    up=d(block.mlp.w_up.weight),
                    down=d(block.mlp.w_down.weight),
                )
            )

    def norm(self, x, weight):
        return x / math.sqrt(float((x * x).mean()) + self.cfg.norm_eps) * weight

    def mlp(self, x, p):
        g = p["gate"] @ x
        return p["down"] @ (g / (1 + torch.exp(-g)) * (p["up"] @ x))

    def run(self, tokens, positions, extra_kv=None, n_layers=None, capture=None):
        """Causal transformer over tokens at the given RoPE positions.

        extra_kv(layer, i, kv_head) -> (keys, values): additional (already rotated) key/value
        vectors that query i may attend to at that layer. capture(layer, q_raw, k_raw, k_rot, v)
        receives per-token lists of per-head vectors. Returns the final hidden vectors.
        """
        cfg = self.cfg
        D, Hq, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        group = Hq // Hkv
        x = [self.emb[t].clone() for t in tokens]
        rots = [rotation(p, D, cfg.rope_theta) for p in positions]
        for layer, p in enumerate(self.layers[:n_layers]):
            h = [self.norm(xi, p["attn_norm"]) for xi in x]
            q_raw = [[p["wq"][j] @ hi for j in range(Hq)] for hi in h]
            k_raw = [[p["wk"][j] @ hi for j in range(Hkv)] for hi in h]
            v = [[p["wv"][j] @ hi for j in range(Hkv)] for hi in h]
            q = [[r @ qj for qj in qi] for r, qi in zip(rots, q_raw)]
            k = [[r @ kj for kj in ki] for r, ki in zip(rots, k_raw)]
            if capture is not None:
                capture(layer, q_raw, k_raw, k, v)
            out = []
            for i in range(len(tokens)):
                heads = []
                for hq in range(Hq):
                    hk = hq // group
                    keys, values = extra_kv(layer, i, hk) if extra_kv else ([], [])
                    keys = keys + [k[j][hk] for j in range(i + 1)]
                    values = values + [v[j][hk] for j in range(i + 1)]
                    heads.append(softmax_attend(q[i][hq], keys, values, D))
                out.append(p["wo"] @ torch.cat(heads))
            x = [xi + oi for xi, oi in zip(x, out)]
            x = [xi + self.mlp(self.norm(xi, p["mlp_norm"]), p) for xi in x]
        return x

    def logits(self, hidden):
        return torch.stack([self.head @ self.norm(h, self.final_norm) for h in hidden])

    # -- the model's two uses --------------------------------------------------------------

    def forward(self, tokens, memories=None, mem_mask=None):
        """Logits (T, V) for one sequence. memories (C, M, L, 2, Hkv, k, D) per chunk, or a
        list of C lists of (keys, values) per layer and head (see dense_memory)."""
        cfg = self.cfg
        tokens = [int(t) for t in tokens]
        if memories is None:
            return self.logits(self.run(tokens, list(range(len(tokens)))))
        seq = [cfg.ref_bos_id] + tokens
        positions = [0] + [cfg.ref_max_tokens + 1 + t for t in range(len(tokens))]

        def extra_kv(layer, i, hk):
            if i == 0 or layer >= cfg.n_mem_layers:  # the sink and plain layers see no memory
                return [], []
            chunk = (i - 1) // cfg.mem_chunk_size
            return memory_kv(memories, mem_mask, chunk, layer, hk)

        return self.logits(self.run(seq, positions, extra_kv)[1:])

    def encode(self, ref, top_k, combine="sum"):
        """One unpadded reference -> per layer and KV head: sorted kept positions and their
        (rotated key, value) vectors. Score w_j = sum_i exp(q_i . k_j / sqrt(D)), summed
        over query heads (combine="sum"/"mean") or maxed ("max"), with i, j over the
        reference's own tokens (positions 1..n), no mask, no RoPE."""
        cfg = self.cfg
        seq = [cfg.ref_bos_id] + [int(t) for t in ref]
        captured = {}
        self.run(
            seq,
            list(range(len(seq))),
            n_layers=cfg.n_mem_layers,
            capture=lambda layer, *tensors: captured.__setitem__(layer, tensors),
        )
        group = cfg.n_heads // cfg.n_kv_heads
        result = []
        for layer in range(cfg.n_mem_layers):
            q_raw, k_raw, k_rot, v = captured[layer]
            per_head = []
            for hk in range(cfg.n_kv_heads):
                scores = []
                for j in range(1, len(seq)):
                    per_query_head = []
                    for g in range(group):
                        w = 0.0
                        for i in range(1, len(seq)):
                            w += math.exp(float(q_raw[i][hk * group + g] @ k_raw[j][hk]) / math.sqrt(cfg.head_dim))
                        per_query_head.append(w)
                    if combine == "max":
                        scores.append(max(per_query_head))
                    else:
                        scores.append(sum(per_query_head) / (group if combine == "mean" else 1))
                ranked = sorted(range(1, len(seq)), key=lambda j: -scores[j - 1])
                kept = sorted(ranked[:top_k])
                per_head.append(
                    dict(
                        positions=kept,
                        scores=scores,
                        keys=[k_rot[j][hk] for j in kept],
                        values=[v[j][hk] for j in kept],
                    )
                )
            result.append(per_head)
        return result


def memory_kv(memories, mem_mask, chunk, layer, hk):
    """The (keys, values) of chunk's memories at one layer and KV head, valid slots only."""
    keys, values = [], []
    if isinstance(memories, list):  # dense form: memories[chunk] = list of encode() results
        for enc in memories[chunk]:
            keys += enc[layer][hk]["keys"]
            values += enc[layer][hk]["values"]
        return keys, values
    C, M, L, _, H, k, D = memories.shape
    for m in range(M):
        for s in range(k):
            if mem_mask is None or bool(mem_mask[chunk, m, s]):
                keys.append(memories[chunk, m, layer, 0, hk, s].double())
                values.append(memories[chunk, m, layer, 1, hk, s].double())
    return keys, values
