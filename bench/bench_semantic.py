"""L1 semantic tier on the labelled pairs of tests/data/semantic_pairs.jsonl.

1. End to end at the defaults: a semantic node (real Gemma 3 270M, real MiniLM, FAISS, LMDB)
   answers every cached prompt (L3, indexed), then every paraphrase and near-miss query with
   ``Request(semantic=True)``: how many are served from L1, and how many of those are wrong.
2. Pairwise sweep: for each pair (cache holds ``cached``, request is ``query``) the cosine
   similarity, the lexical verdict and the gate's log-prob delta; then precision, recall and
   false-hit rates for tau in a sweep, without the gate, lexical only, model only and both.
3. Gate cost: the gate's time (embed + search + teacher-forced prefill) against generating the
   answer, for the QA answers of the set and for 64-token answers.

0. Adversarial near-misses, dev vs holdout side by side (`adversarial_table`): the pairs of
   tests/data/l1_adversarial.jsonl (split dev / holdout, 20 kinds of one-word near-miss and
   paraphrases) with the near-misses and paraphrases of semantic_pairs.jsonl (dev: the rules
   were tuned on it) and semantic_pairs_heldout.jsonl (holdout). Every cached prompt in one
   index; each query is gated as SemanticTier.lookup does (FAISS top-k >= tau, at most
   max_gated candidates through lexical + model gate), so a near-miss also counts as a false
   hit when it is served *another* cached answer. Also the pairwise false-hit rate (only the
   pair's own cached prompt) and the lexical rules alone without tau (the worst case: a
   cached prompt that an embedding puts above tau).

Usage: flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_semantic.py \
           [--adversarial-only] [--pairs tests/data/semantic_pairs_heldout.jsonl] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from p2pcache import LocalNode, NodeOptions, Request, SamplingParams
from p2pcache.semantic.gate import DEFAULT_MARGIN
from p2pcache.semantic.lexical import lexical_reject
from p2pcache.semantic.tier import DEFAULT_TAU, phrase_similarity

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
PAIRS = DATA / "semantic_pairs.jsonl"
ADVERSARIAL = DATA / "l1_adversarial.jsonl"
SPLIT_OF = {"semantic_pairs.jsonl": "dev", "semantic_pairs_heldout.jsonl": "holdout"}
PARAMS = SamplingParams(max_tokens=48, stop=("\n",))


def qa(text: str) -> str:
    return f"Question: {text}\nAnswer:"


def load_adversarial() -> list[dict]:
    """The adversarial set plus the near-misses and paraphrases of the two older sets, each
    row with its split; the older sets' near-miss kinds are prefixed "older:"."""
    rows = [json.loads(line) for line in ADVERSARIAL.read_text().splitlines() if line.strip()]
    for name, split in SPLIT_OF.items():
        for line in (DATA / name).read_text().splitlines():
            r = json.loads(line)
            if r["label"] == "unrelated":
                continue  # their queries are other pairs' paraphrases
            kind = r["kind"] if r["label"] == "paraphrase" else f"older:{r['kind']}"
            rows.append({**r, "split": split, "kind": kind, "source": name})
    return rows


def adversarial_table(node: LocalNode) -> None:
    tier = node.semantic
    assert tier is not None
    rows = load_adversarial()
    cached = sorted({r["cached"] for r in rows})
    t0 = time.perf_counter()
    answers: dict[str, list[int]] = {}
    for text in cached:
        a = trio.run(node.resolve, Request(prompt=qa(text), params=PARAMS, semantic=True))
        answers[qa(text)] = a.tokens
    fill_s = time.perf_counter() - t0
    emb, cfg = tier.embedder, tier.config
    similarity = phrase_similarity(emb)
    rec_of = {r.text: r for r in tier.index.records()}
    lex_memo: dict[tuple[str, str], str | None] = {}
    model_memo: dict[tuple[str, str], bool] = {}

    def lexical(query: str, cached_text: str) -> str | None:
        key = (query, cached_text)
        if key not in lex_memo:
            lex_memo[key] = lexical_reject(qa(query), cached_text, similarity)
        return lex_memo[key]

    def model_ok(query: str, rec) -> bool:  # type: ignore[no-untyped-def]
        key = (query, rec.text)
        if key not in model_memo:
            s_ = node.backend.score(
                node.backend.tokenize(qa(query)), answers[rec.text][: rec.gate_tokens]
            )
            model_memo[key] = s_.mean_logprob - rec.base_logprob >= -cfg.margin
        return model_memo[key]

    def gate(query: str, rec) -> bool:  # type: ignore[no-untyped-def]
        return lexical(query, rec.text) is None and model_ok(query, rec)

    same_as: dict[str, set[str]] = {}  # query -> cached prompts whose answer is right for it
    for r in rows:
        same_as.setdefault(r["query"], {qa(r["query"])})
        if r["label"] == "paraphrase":
            same_as[r["query"]].add(qa(r["cached"]))
    t0 = time.perf_counter()
    for r in rows:
        vec = emb.embed_one(qa(r["query"]))
        own = rec_of[qa(r["cached"])]
        r["sim"] = float(np.dot(vec, own.vec()))
        r["lexical"] = lexical(r["query"], own.text)
        r["pairwise"] = r["sim"] >= cfg.tau and gate(r["query"], own)
        served = None  # the ladder: neighbours above tau, at most max_gated through the gate
        gated = 0
        for sim, rec in tier.index.search(vec, cfg.k):
            if sim < cfg.tau or gated >= cfg.max_gated:
                break
            gated += 1
            if gate(r["query"], rec):
                served = rec
                break
        r["served_prompt"] = served.text if served is not None else None
        r["right"] = served is not None and served.text == qa(r["cached"])
        # A near-miss query that is itself a cached prompt (or labelled a paraphrase of one)
        # is rightly served that prompt's answer: not a false hit.
        r["served"] = served is not None and served.text not in same_as.get(r["query"], ())
    gate_s = time.perf_counter() - t0

    def cell(split: str, kind: str | None, label: str, key: str) -> str:
        sel = [
            r
            for r in rows
            if r["split"] == split and r["label"] == label and kind in (None, r["kind"])
        ]
        if not sel:
            return "-"
        if key == "lexical_alone":
            n = sum(r["lexical"] is None for r in sel)
        elif label == "paraphrase" and key == "served":
            n = sum(r["right"] for r in sel)  # served its own answer
        else:
            n = sum(bool(r[key]) for r in sel)
        return f"{n}/{len(sel)} ({n / len(sel):.1%})"

    near_kinds = sorted({r["kind"] for r in rows if r["label"] == "near_miss"})
    print(
        f"\n## Adversarial near-misses: dev vs holdout (tau {cfg.tau}, margin {cfg.margin}, "
        f"k {cfg.k}, max_gated {cfg.max_gated}; {len(cached)} cached prompts in one index)\n"
    )
    print(
        "served = the ladder served the query a cached answer (index-wide); pairwise = only the "
        "pair's own cached prompt; lexical alone = the lexical rules pass it at any similarity.\n"
    )
    print(
        "| kind | dev: false hits (served) | dev: pairwise | dev: lexical alone "
        "| holdout: false hits (served) | holdout: pairwise | holdout: lexical alone |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in [*near_kinds, None]:
        name = "**all near-misses**" if kind is None else kind
        cells = [
            cell(split, kind, "near_miss", key)
            for split in ("dev", "holdout")
            for key in ("served", "pairwise", "lexical_alone")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for source in (None, *SPLIT_OF):
        sub = [r for r in rows if r["label"] == "paraphrase" and r.get("source") == source]
        name = "l1_adversarial.jsonl" if source is None else source
        cells = []
        for split in ("dev", "holdout"):
            sel = [r for r in sub if r["split"] == split]
            for key in ("right", "pairwise", "lexical_alone"):
                if not sel:
                    cells.append("-")
                    continue
                n = sum(
                    (r["lexical"] is None) if key == "lexical_alone" else bool(r[key]) for r in sel
                )
                cells.append(f"{n}/{len(sel)} ({n / len(sel):.1%})")
        print(f"| paraphrases served, {name} | " + " | ".join(cells) + " |")
    print(
        "| **paraphrases served, all** | "
        + " | ".join(
            cell(split, None, "paraphrase", key)
            for split in ("dev", "holdout")
            for key in ("served", "pairwise", "lexical_alone")
        )
        + " |"
    )
    print(
        f"\n(filling the cache: {fill_s:.0f} s; gating {len(rows)} queries: {gate_s:.0f} s, "
        f"{len(model_memo)} model scores)"
    )
    for r in rows:
        if r["label"] == "near_miss" and r["served"]:
            print(
                f"  {r['split']} false hit: [{r['kind']}] {r['query']!r} got the answer of "
                f"{r['served_prompt']!r} (its pair: {r['cached']!r})"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--adversarial-only", action="store_true", help="only the dev / holdout near-miss table"
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N pairs of each label")
    ap.add_argument("--pairs", type=Path, default=PAIRS, help="labelled pairs (JSON lines)")
    args = ap.parse_args()
    if args.adversarial_only:
        tmp = Path(tempfile.mkdtemp(prefix="bench-semantic-"))
        node = LocalNode.open(NodeOptions(data_dir=tmp, semantic=True, n_ctx=2048, durable=False))
        adversarial_table(node)
        node.close()
        return
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    if args.limit:
        by: dict[str, list] = {}
        for p in pairs:
            by.setdefault(p["label"], []).append(p)
        pairs = [p for v in by.values() for p in v[: args.limit]]
    cached_texts = sorted({p["cached"] for p in pairs})
    tmp = Path(tempfile.mkdtemp(prefix="bench-semantic-"))
    node = LocalNode.open(NodeOptions(data_dir=tmp, semantic=True, n_ctx=2048, durable=False))
    tier = node.semantic
    assert tier is not None
    counts = ", ".join(
        f"{k} {sum(p['label'] == k for p in pairs)}"
        for k in ("paraphrase", "unrelated", "near_miss")
    )
    print(
        f"pairs: {args.pairs.name}, {len(pairs)} ({counts}); "
        f"cached prompts: {len(cached_texts)}; tau {tier.config.tau}, margin {tier.config.margin}"
    )

    # -- 1. fill the cache (L3), then end-to-end lookups at the defaults -----------------
    gen_ms: dict[str, float] = {}
    answers: dict[str, list[int]] = {}
    for text in cached_texts:
        a = trio.run(node.resolve, Request(prompt=qa(text), params=PARAMS, semantic=True))
        assert a.cache_level == "L3", a.cache_level
        gen_ms[text] = a.timings.prefill_ms + a.timings.decode_ms
        answers[text] = a.tokens
    rec_of = {r.text: r for r in tier.index.records()}
    e2e = {"paraphrase": [0, 0, 0], "near_miss": [0, 0, 0]}  # served right, served wrong, total
    l1_ms = []
    l1_gate: list[tuple[float, float]] = []  # (gate ms of an L1 hit, L3 ms of the answer it served)
    wrong: list[str] = []
    for p in pairs:
        if p["label"] == "unrelated":
            continue  # its query is another pair's paraphrase: counted there
        t0 = time.perf_counter()
        a = trio.run(node.resolve, Request(prompt=qa(p["query"]), params=PARAMS, semantic=True))
        row = e2e[p["label"]]
        row[2] += 1
        if a.cache_level == "L1":
            l1_ms.append((time.perf_counter() - t0) * 1000)
            l1_gate.append(
                (
                    a.semantic.gate["ms"],
                    gen_ms.get(
                        a.semantic.source_prompt[len("Question: ") : -len("\nAnswer:")], 0.0
                    ),
                )
            )
            right = p["label"] == "paraphrase" and a.semantic.source_prompt == qa(p["cached"])
            row[0 if right else 1] += 1
            if not right:
                wrong.append(
                    f"  [{p['kind']}] {p['query']!r} got the answer of "
                    f"{a.semantic.source_prompt!r} "
                    f"(sim {a.semantic.similarity:.3f}, gate delta {a.semantic.gate['delta']:.2f})"
                )
        # drop the query's own L3 entry so later queries see only the cached prompts
        if a.cache_level == "L3":
            node.store.delete(a.input_sha256)
            tier.index.forget(a.input_sha256)
    print("\n## End to end at the defaults (all cached prompts in one index)\n")
    print("| queries | served from L1 | served the right answer | served a wrong answer |")
    print("|---|---:|---:|---:|")
    for label, (ok, bad, n) in e2e.items():
        print(
            f"| {label} ({n}) | {ok + bad} ({(ok + bad) / n:.1%}) | {ok} ({ok / n:.1%}) "
            f"| {bad} ({bad / n:.1%}) |"
        )
    if wrong:
        print("\nWrong answers served:\n" + "\n".join(wrong))
    if l1_ms:
        print(
            f"\nL1 hit latency (resolve, incl. embed + search + gate): "
            f"median {statistics.median(l1_ms):.0f} ms; "
            f"the gate alone (lexical + prefill) "
            f"median {statistics.median(g for g, _ in l1_gate):.0f} ms; "
            f"L3 generation of the answers served "
            f"median {statistics.median(x for _, x in l1_gate):.0f} ms"
        )

    # -- 2. pairwise scores ------------------------------------------------------------
    emb = tier.embedder
    similarity = phrase_similarity(emb)
    rows = []
    gate_ms = []
    for p in pairs:
        rec = rec_of[qa(p["cached"])]
        t0 = time.perf_counter()
        qv = emb.embed_one(qa(p["query"]))
        sim = float(np.dot(qv, rec.vec()))
        embed_ms = (time.perf_counter() - t0) * 1000
        lex = lexical_reject(qa(p["query"]), rec.text, similarity)
        q_tokens = node.backend.tokenize(qa(p["query"]))
        ans = answers[p["cached"]][: rec.gate_tokens]
        if ans:
            s = node.backend.score(q_tokens, ans)
            delta, agree, score_ms = s.mean_logprob - rec.base_logprob, s.argmax_agreement, s.ms
        else:
            delta, agree, score_ms = float("-inf"), 0.0, 0.0
        gate_ms.append((embed_ms + score_ms, gen_ms[p["cached"]]))
        rows.append({**p, "sim": sim, "lex": lex, "delta": delta, "agree": agree})
    (tmp / "pair_scores.json").write_text(json.dumps(rows, indent=1, default=str))

    def rates(tau: float, mode: str, margin: float = DEFAULT_MARGIN) -> dict[str, float]:
        served = {"paraphrase": 0, "unrelated": 0, "near_miss": 0}
        total = {"paraphrase": 0, "unrelated": 0, "near_miss": 0}
        for r in rows:
            total[r["label"]] += 1
            ok = r["sim"] >= tau
            if mode in ("lexical", "both"):
                ok = ok and r["lex"] is None
            if mode in ("model", "both"):
                ok = ok and r["delta"] >= -margin
            served[r["label"]] += ok
        tp = served["paraphrase"]
        fp = served["unrelated"] + served["near_miss"]
        return {
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / total["paraphrase"],
            "fh_near": served["near_miss"] / total["near_miss"],
            "fh_unrel": served["unrelated"] / total["unrelated"],
        }

    print("\n## Pairwise sweep (cache holds the pair's prompt, the query asks the other)\n")
    print(f"margin {DEFAULT_MARGIN} nats/token for the model gate\n")
    print(
        "| tau | gate | precision | paraphrases served (recall) | false hits, near-misses "
        "| false hits, unrelated |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for tau in (0.60, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95):
        for mode in ("none", "lexical", "model", "both"):
            r = rates(tau, mode)
            mark = " **(default)**" if abs(tau - DEFAULT_TAU) < 1e-9 and mode == "both" else ""
            print(
                f"| {tau:.2f} | {mode}{mark} | {r['precision']:.1%} | {r['recall']:.1%} "
                f"| {r['fh_near']:.1%} | {r['fh_unrel']:.1%} |"
            )
    print(f"\n### Margin sweep at tau {DEFAULT_TAU} (gate: lexical + model)\n")
    print("| margin | precision | recall | false hits, near-misses |")
    print("|---:|---:|---:|---:|")
    for margin in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 1e9):
        r = rates(DEFAULT_TAU, "both", margin)
        print(
            f"| {'inf' if margin > 1e8 else margin} | {r['precision']:.1%} | {r['recall']:.1%} "
            f"| {r['fh_near']:.1%} |"
        )
    near = [r for r in rows if r["label"] == "near_miss" and r["sim"] >= DEFAULT_TAU]
    print(
        f"\nNear-misses above tau {DEFAULT_TAU}: {len(near)}; "
        f"caught by lexical {sum(r['lex'] is not None for r in near)}, "
        f"by the model only "
        f"{sum(r['lex'] is None and r['delta'] < -DEFAULT_MARGIN for r in near)}, "
        f"passed both {sum(r['lex'] is None and r['delta'] >= -DEFAULT_MARGIN for r in near)}"
    )
    for r in near:
        if r["lex"] is None and r["delta"] >= -DEFAULT_MARGIN:
            print(
                f"  passed: [{r['kind']}] {r['cached']!r} -> {r['query']!r} sim {r['sim']:.3f} "
                f"delta {r['delta']:.2f}"
            )

    # -- 2b. index-wide sweep -------------------------------------------------------------
    # What the ladder does with the whole index, for other settings than the defaults: each
    # query's nearest cached prompts, gated in order as SemanticTier.lookup does (at most
    # max_gated model calls), so a near-miss can also be served another pair's answer.
    lex_memo: dict[tuple[str, str], str | None] = {}
    delta_memo: dict[tuple[str, str], float] = {}

    def gate_verdict(query: str, rec, mode: str, margin: float) -> bool:  # type: ignore[no-untyped-def]
        key = (query, rec.text)
        if mode in ("lexical", "both"):
            if key not in lex_memo:
                lex_memo[key] = lexical_reject(qa(query), rec.text, similarity)
            if lex_memo[key] is not None:
                return False
        if mode in ("model", "both"):
            if key not in delta_memo:
                ans = answers[rec.text[len("Question: ") : -len("\nAnswer:")]][: rec.gate_tokens]
                s_ = node.backend.score(node.backend.tokenize(qa(query)), ans)
                delta_memo[key] = s_.mean_logprob - rec.base_logprob
            if delta_memo[key] < -margin:
                return False
        return True

    queries = [p for p in pairs if p["label"] != "unrelated"]
    neighbours = {
        p["query"]: tier.index.search(emb.embed_one(qa(p["query"])), tier.config.k) for p in queries
    }

    def index_wide(
        tau: float, mode: str, margin: float = DEFAULT_MARGIN
    ) -> tuple[int, int, int, int]:
        right = wrong_para = wrong_near = 0
        for p in queries:
            served = None
            gated = 0
            for sim, rec in neighbours[p["query"]]:
                if sim < tau or (mode != "none" and gated >= tier.config.max_gated):
                    break
                gated += 1
                if mode == "none" or gate_verdict(p["query"], rec, mode, margin):
                    served = rec
                    break
            if served is None:
                continue
            if p["label"] == "near_miss":
                wrong_near += 1
            elif served.text == qa(p["cached"]):
                right += 1
            else:
                wrong_para += 1
        return right, wrong_para, wrong_near, len(queries)

    n_para = sum(p["label"] == "paraphrase" for p in queries)
    n_near = len(queries) - n_para
    print("\n## Index-wide sweep (every cached prompt in one index, gated as the ladder does)\n")
    print(
        "| tau | gate | paraphrases served their answer | paraphrases served another answer "
        "| near-misses served (false hits) |"
    )
    print("|---:|---|---:|---:|---:|")
    for tau in (0.70, 0.75, 0.80, 0.85, 0.90):
        for mode in ("none", "lexical", "both"):
            right, wp, wn, _ = index_wide(tau, mode)
            mark = " **(default)**" if abs(tau - DEFAULT_TAU) < 1e-9 and mode == "both" else ""
            print(
                f"| {tau:.2f} | {mode}{mark} | {right} ({right / n_para:.1%}) "
                f"| {wp} ({wp / n_para:.1%}) | {wn} ({wn / n_near:.1%}) |"
            )
    print(f"\nmargin sweep at tau {DEFAULT_TAU}, gate lexical + model:\n")
    print("| margin | paraphrases served their answer | near-misses served |")
    print("|---:|---:|---:|")
    for margin in (0.25, 0.5, 1.0, 2.0):
        right, wp, wn, _ = index_wide(DEFAULT_TAU, "both", margin)
        print(f"| {margin} | {right} ({right / n_para:.1%}) | {wn} ({wn / n_near:.1%}) |")

    # -- 3. gate cost ------------------------------------------------------------------
    # What an L1 hit spends before answering (embed + FAISS search + lexical + teacher-forced
    # prefill of new prompt + the first gate_tokens answer tokens) against generating the
    # answer (L3: prefill + decode). The gate scores a bounded answer prefix, so its cost is
    # flat in the answer length while generation grows with it.
    ratios = [g / max(gen, 1e-9) for g, gen in gate_ms]
    print("\n## Gate cost\n")
    print(
        "| answers | median answer tokens | median generation ms "
        "| median gate ms (embed + lexical + prefill) | median gate / generation |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| QA set as cached (stop at newline, <=48 tokens) "
        f"| {statistics.median(len(v) for v in answers.values()):.0f} | "
        f"{statistics.median(gen for _, gen in gate_ms):.0f} "
        f"| {statistics.median(g for g, _ in gate_ms):.0f} | {statistics.median(ratios):.2f} |"
    )
    n_long = min(8, len(cached_texts))
    for max_tokens in (16, 64, 128, 256):
        long_rows = []
        for text in cached_texts[:n_long]:
            toks = node.backend.tokenize(qa(text))
            t0 = time.perf_counter()
            g = node.backend.generate(toks, SamplingParams(max_tokens=max_tokens))
            gen = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            emb.embed_one(qa(text))
            lexical_reject(qa(text), qa(text), similarity)
            node.backend.score(toks, g.tokens[: tier.config.gate_tokens])
            long_rows.append((len(g.tokens), gen, (time.perf_counter() - t0) * 1000))
        print(
            f"| up to {max_tokens} tokens ({n_long} prompts; "
            f"gate scores the first {tier.config.gate_tokens}) | "
            f"{statistics.median(r[0] for r in long_rows):.0f} "
            f"| {statistics.median(r[1] for r in long_rows):.0f} | "
            f"{statistics.median(r[2] for r in long_rows):.0f} "
            f"| {statistics.median(r[2] / r[1] for r in long_rows):.2f} |"
        )
    # Last: it adds the adversarial set's prompts to the index the sections above measured.
    adversarial_table(node)
    node.close()
    print(f"\n(scores per pair: {tmp / 'pair_scores.json'})")


if __name__ == "__main__":
    main()
