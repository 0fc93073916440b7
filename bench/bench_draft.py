"""A peer's answer walked as a draft (L2) against computing it here (L3), and the float noise
that decides what a divergence means.

    flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_draft.py [--runs 3]
        [--sizes 64,256] [--json out.json]
    .venv/bin/python bench/bench_draft.py --noise [--prompts 24] [--sizes 64]
    .venv/bin/python bench/bench_draft.py --l1 [--pairs 12] [--sizes 64]

Default (``sweep``): one process, the real model, greedy chat prompts. Per output size and
run: L3 generates the answer (its time is what a miss costs). On this CPU that answer often
leaves the walk at a near-tie (batch-shape noise, see ``--noise``), so the base draft is the
answer the walk accepts whole (L3's, taken the walk's way at such near-ties; printed per run).
Then the draft is walked (`LlamaBackend.follow_draft`, with the local tail after a divergence:
what an L2 answer costs once fetched) as it is, and with its token replaced at 3/4, 1/2, 1/4
of its length and at the first token (a token the local model does not choose there, so the
walk diverges exactly there). Beside it, the tolerance check verification used before (one
teacher-forced pass answering yes/no per token, `LlamaBackend.check`), which could not tell a
near-tie swap from the honest token. Variants are interleaved within each run (this machine's
speed drifts); the table shows medians.

``--noise``: how often, and by how much, an honest answer computed one token at a time
(`generate`) leaves the walk's choices on the same machine (batched and one-token kernels
round differently), greedy and sampled: the share of answers accepted whole, the divergences
per checked token, and the margins and the probability between the tokens at each divergence.
These set `VerifyConfig.near_tie_margin` / ``near_tie_mass`` and the reputation's
``NEAR_TIE_RATE``.

``--l1``: the walk as an exact L1 mode: for labelled paraphrase and near-miss pairs
(tests/data/l1_adversarial.jsonl), the cached prompt's greedy answer walked as the draft of
the new prompt's: how much of it is accepted, and the time against L3 on the new prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_l0 import PROMPTS  # noqa: E402  (long-answer prompts)

EXTRA_PROMPTS = [
    "Describe the water cycle to a ten-year-old.",
    "List the planets of the solar system and one fact about each.",
    "Write a short poem about autumn leaves.",
    "Explain what a hash function is and why it is useful.",
    "Give three tips for learning a new language.",
    "Summarise the plot of a detective story you invent.",
    "What are the main causes of inflation?",
    "Explain how vaccines train the immune system.",
    "Write a letter to a friend about a trip to the mountains.",
    "How does a refrigerator keep food cold?",
    "Tell me about the history of chess.",
    "Why is the sky blue? Explain the physics.",
    "Describe a day in the life of a medieval blacksmith.",
    "What makes a good software engineer?",
    "Explain the rules of football in simple words.",
    "Write a recipe for a vegetable soup.",
    "How do airplanes stay in the air?",
]
ALL_PROMPTS = PROMPTS + EXTRA_PROMPTS


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def load_backend() -> Any:
    from p2pcache.backend import BackendConfig, LlamaBackend, resolve_model_path

    return LlamaBackend(BackendConfig(model_path=resolve_model_path(None), n_ctx=4096))


def altered(draft: list[int], at: int, n_vocab: int) -> list[int]:
    """The draft with token ``at`` replaced by another (the walk diverges there)."""
    out = list(draft)
    out[at] = (out[at] + 1) % n_vocab
    return out


def sweep(runs: int, sizes: list[int]) -> list[dict[str, Any]]:
    from p2pcache.keys import SamplingParams

    backend = load_backend()
    rows: dict[tuple[int, str], dict[str, list[float]]] = {}
    for n in sizes:
        for i in range(runs):
            params = SamplingParams(max_tokens=n)
            prompt = backend.chat_tokens(
                [{"role": "user", "content": ALL_PROMPTS[i % len(ALL_PROMPTS)]}]
            )
            t0 = time.perf_counter()
            gen = backend.generate(prompt, params)
            l3_ms = (time.perf_counter() - t0) * 1000
            # The answer the walk accepts whole (L3's, with its near-tie flips, if any, taken
            # the walk's way): the base the divergence is placed in.
            base, honest_at = gen.tokens, None
            for _ in range(10):
                o = backend.follow_draft(prompt, base, params)
                if o.matches:
                    break
                if honest_at is None and o.divergence is not None:
                    honest_at = o.divergence.position
                assert o.generation is not None
                base = o.generation.tokens
            m = len(base)
            t0 = time.perf_counter()
            backend.check(prompt, base)
            tol_ms = (time.perf_counter() - t0) * 1000
            where = {"none": None, "3/4": 3 * m // 4, "1/2": m // 2, "1/4": m // 4, "first": 0}
            for label, at in where.items():
                draft = base if at is None else altered(base, at, backend.n_vocab)
                t0 = time.perf_counter()
                out = backend.follow_draft(prompt, draft, params)
                ms = (time.perf_counter() - t0) * 1000
                assert out.generation is not None
                if at is None and not out.matches:
                    print(f"  run {i}: the walk's own answer diverged: {out.divergence}")
                r = rows.setdefault((n, label), {k: [] for k in ("l3", "l2", "acc", "loc", "tol")})
                r["l3"].append(l3_ms)
                r["l2"].append(ms)
                r["acc"].append(out.accepted)
                r["loc"].append(out.local_tokens)
                r["tol"].append(tol_ms)
            print(
                f"  size {n} run {i}: {m} tokens, L3 {l3_ms:.0f} ms; L3's own answer walked: "
                f"{'accepted whole' if honest_at is None else f'near-tie at token {honest_at}'}",
                flush=True,
            )
    table = []
    for (n, label), r in rows.items():
        table.append(
            {
                "max_tokens": n,
                "diverge_at": label,
                "accepted": med(r["acc"]),
                "local": med(r["loc"]),
                "l3_ms": med(r["l3"]),
                "l2_ms": med(r["l2"]),
                "l2_over_l3": med(r["l2"]) / med(r["l3"]),
                "tolerance_check_ms": med(r["tol"]),
            }
        )
    return table


def noise(n_prompts: int, sizes: list[int]) -> dict[str, Any]:
    from p2pcache.keys import SamplingParams

    backend = load_backend()
    result: dict[str, Any] = {}
    for mode in ("greedy", "sampled"):
        answers = whole = divergences = checked = 0
        margins: list[float] = []
        masses: list[float] = []
        positions: list[int] = []
        for n in sizes:
            for i in range(n_prompts):
                params = SamplingParams(
                    max_tokens=n, temperature=0.0 if mode == "greedy" else 0.8, seed=17 + i
                )
                prompt = backend.chat_tokens(
                    [{"role": "user", "content": ALL_PROMPTS[i % len(ALL_PROMPTS)]}]
                )
                gen = backend.generate(prompt, params)
                out = backend.follow_draft(prompt, gen.tokens, params, tail=False)
                answers += 1
                d = out.divergence
                if d is None:
                    whole += out.matches
                    checked += len(gen.tokens)
                    continue
                divergences += 1
                checked += d.position + 1
                margins.append(abs(d.margin))
                masses.append(d.mass_between)
                positions.append(d.position)
        result[mode] = {
            "answers": answers,
            "accepted_whole": whole,
            "divergences": divergences,
            "checked_tokens": checked,
            "divergences_per_token": divergences / max(1, checked),
            "positions": positions,
            "margin_p50": med(margins),
            "margin_max": max(margins, default=0.0),
            "mass_between_max": max(masses, default=0.0),
            "margins": [round(x, 4) for x in margins],
            "masses": [round(x, 4) for x in masses],
        }
    return result


def l1_exact(pairs: int, n_tokens: int) -> dict[str, Any]:
    """The walk as an exact L1: a similar prompt's cached answer as the draft for the new one."""
    from p2pcache.keys import SamplingParams

    backend = load_backend()
    data = [
        json.loads(line)
        for line in (ROOT / "tests" / "data" / "l1_adversarial.jsonl").read_text().splitlines()
        if line.strip()
    ]
    params = SamplingParams(max_tokens=n_tokens)
    result: dict[str, Any] = {}
    for label in ("paraphrase", "near_miss"):
        rows = [d for d in data if d["label"] == label][::7][:pairs]
        acc, frac, ratio = [], [], []
        for d in rows:
            cached = backend.chat_tokens([{"role": "user", "content": d["cached"]}])
            query = backend.chat_tokens([{"role": "user", "content": d["query"]}])
            draft = backend.generate(cached, params).tokens
            t0 = time.perf_counter()
            l3 = backend.generate(query, params)
            l3_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            out = backend.follow_draft(query, draft, params)
            ms = (time.perf_counter() - t0) * 1000
            acc.append(out.accepted)
            frac.append(out.accepted / max(1, len(l3.tokens)))
            ratio.append(ms / l3_ms)
        result[label] = {
            "pairs": len(rows),
            "accepted_p50": med(acc),
            "accepted_share_p50": med(frac),
            "accepted_whole": sum(f >= 1 for f in frac),
            "time_vs_l3_p50": med(ratio),
        }
    return result


def print_sweep(table: list[dict[str, Any]]) -> None:
    head = (
        f"{'tokens':>6} {'diverge at':>10} {'accepted':>8} {'local':>6} {'L3 ms':>8} "
        f"{'L2 ms':>8} {'L2/L3':>6} {'tolerance check ms':>18}"
    )
    print(head)
    for r in table:
        print(
            f"{r['max_tokens']:>6} {r['diverge_at']:>10} {r['accepted']:>8.0f} {r['local']:>6.0f} "
            f"{r['l3_ms']:>8.0f} {r['l2_ms']:>8.0f} {r['l2_over_l3']:>6.2f} "
            f"{r['tolerance_check_ms']:>18.0f}"
        )


def print_noise(result: dict[str, Any]) -> None:
    print(
        f"{'mode':>8} {'answers':>7} {'whole':>6} {'diverged':>8} {'per token':>9} "
        f"{'margin p50':>10} {'margin max':>10} {'mass max':>8}"
    )
    for mode, r in result.items():
        print(
            f"{mode:>8} {r['answers']:>7} {r['accepted_whole']:>6} {r['divergences']:>8} "
            f"{r['divergences_per_token']:>9.4f} {r['margin_p50']:>10.3f} {r['margin_max']:>10.3f} "
            f"{r['mass_between_max']:>8.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="prompts per size (sweep)")
    ap.add_argument("--sizes", default="64,256", help="output sizes, comma-separated")
    ap.add_argument("--noise", action="store_true", help="measure honest divergences instead")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per size and mode (noise)")
    ap.add_argument(
        "--l1", action="store_true", help="the walk as an exact L1 on the labelled pairs"
    )
    ap.add_argument("--pairs", type=int, default=12, help="pairs per label (--l1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.l1:
        result: Any = l1_exact(args.pairs, sizes[0])
        for label, r in result.items():
            print(label, json.dumps(r))
    elif args.noise:
        result = noise(args.prompts, sizes)
        print_noise(result)
    else:
        result = sweep(args.runs, sizes)
        print_sweep(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
