"""`p2pcache demo`: three local nodes, a short workload, and where each answer came from."""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from p2pcache.cli.common import err_console, fail, list_layout, out_console, print_line
from p2pcache.paths import HOME_ENV

LEVEL_STYLE = {"L0": "green", "L1": "cyan", "L2": "magenta", "L3": "yellow"}
LEVEL_NOTE = {"L0": "local cache", "L1": "similar prompt", "L2": "from a peer", "L3": "computed"}


def _ask(
    client: Any,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    chat: bool = False,
    stream: bool = False,
    stop: list[str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "share": True,
        "stream": stream,
    }
    if stop:
        body["stop"] = stop
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    if not stream:
        r = client.post(url + path, json=body)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{url}{path} answered {r.status_code}: {r.text[:300]}")
        doc = r.json()
        choice = doc["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return {"level": doc["x_cache"]["level"], "ms": ms, "text": text, "x": doc["x_cache"]}
    import json

    parts, x, first_ms = [], None, None
    with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}{path} answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            first_ms = first_ms or (time.perf_counter() - t0) * 1000
            x = chunk["x_cache"]
            for c in chunk["choices"]:
                parts.append((c.get("delta") or {}).get("content") or c.get("text") or "")
    return {
        "level": x["level"] if x else "?",
        "ms": (time.perf_counter() - t0) * 1000,
        "text": "".join(parts),
        "x": x,
    }


def _row_cells(i: int, node: str, what: str, r: dict[str, Any]) -> list[str]:
    lvl = r["level"]
    note = LEVEL_NOTE.get(lvl, "")
    if r["x"] and r["x"].get("single_flight"):
        note = "single-flight"
    return [
        str(i),
        node,
        what,
        f"{lvl} {note}",
        f"{r['ms']:.1f}",
        str(r["x"]["timings"]["completion_tokens"] if r["x"] else "?"),
    ]


def _print_answers(rows: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    """The answers with where each came from: a table on a wide terminal; else (a narrow one,
    a pipe) one line per answer with its text below, since an answer column squeezed next to
    six others would show one word per line."""
    if list_layout():
        out_console.print("Where each answer came from:")
        for i, (node, what, _prompt, r) in enumerate(rows, 1):
            num, name, req, level, ms, tokens = _row_cells(i, node, what, r)
            line = Text(f"{num:>2} {name}  {req:<16} ")
            line.append(f"{level:<17}", style=LEVEL_STYLE.get(r["level"], "white"))
            line.append(f" {ms:>8} ms  {tokens} tokens")
            out_console.print(line, highlight=False, soft_wrap=True)
            text = " ".join(r["text"].split())
            width = max(20, min(out_console.width, 100) - 4)
            print_line("   " + (text[:width] + ("…" if len(text) > width else "")))
        return
    table = Table(title="Where each answer came from")
    for col, just in (
        ("#", "right"),
        ("node", "left"),
        ("request", "left"),
        ("level", "left"),
        ("ms", "right"),
        ("tokens", "right"),
        ("answer", "left"),
    ):
        table.add_column(
            col,
            justify=just,
            no_wrap=col != "answer",
            overflow="fold" if col == "answer" else "ellipsis",
        )
    for i, (node, what, _prompt, r) in enumerate(rows, 1):
        text = " ".join(r["text"].split())
        answer = text[:40] + ("…" if len(text) > 40 else "")
        cells = _row_cells(i, node, what, r)
        cells[3] = f"[{LEVEL_STYLE.get(r['level'], 'white')}]{cells[3]}"
        table.add_row(*cells, answer)
    out_console.print(table)


def demo(
    data_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--data-dir",
            help="Keep the nodes' data here (DIR/node-1 ...); "
            "default: a fresh temporary dir, deleted afterwards.",
        ),
    ] = None,
    nodes: Annotated[
        int, typer.Option("--nodes", min=2, max=8, help="How many local nodes to start.")
    ] = 3,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, max=256, help="Tokens per answer at most.")
    ] = 24,
    timeout: Annotated[
        float, typer.Option("--timeout", min=10, help="Give up after this many seconds in all.")
    ] = 600.0,
) -> None:
    """Start local nodes, send a short workload, and print where each answer came from.

    Each node is a separate `p2pcache node run` process on 127.0.0.1 with its own data dir.
    The workload repeats questions on one node (L0), asks another node a question the first
    already answered (L2 once nodes share entries over the network, else L3), and sends
    identical requests at once (computed once: single-flight).
    """
    import httpx

    from p2pcache.node.cluster import NodeStartError, start_node, stop_all, wait_ready

    deadline = time.monotonic() + timeout
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="p2pcache-demo-"))
        root = tmp
    else:
        root = data_dir.expanduser()
        root.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        with err_console.status(f"Starting {nodes} nodes in {root} ..."):
            t0 = time.perf_counter()
            # The demo's nodes do not become the CLI's "last node": a node the user runs keeps
            # being found by `p2pcache node status` & co.
            env = {HOME_ENV: str(root / "cli-home")}
            first = start_node("node-1", root / "node-1", wait=False, env=env)
            procs.append(first)
            wait_ready(first, timeout=max(1.0, deadline - time.monotonic()))
            for i in range(2, nodes + 1):
                procs.append(
                    start_node(
                        f"node-{i}",
                        root / f"node-{i}",
                        wait=False,
                        extra=("--bootstrap-http", first.url, "--log-level", "warning"),
                        env=env,
                    )
                )
            for p in procs[1:]:
                wait_ready(p, timeout=max(1.0, deadline - time.monotonic()))
        out_console.print(
            f"{nodes} nodes ready in {time.perf_counter() - t0:.1f} s (data in {root}):"
        )
        for p in procs:
            out_console.print(f"  {p.name}  {p.url}  peer {p.peer_id[:16]}…  pid {p.proc.pid}")
        model = procs[0].ready["model"]
        networked = any(p.ready.get("addrs") for p in procs)
        n1, n2, n3 = procs[0], procs[1], procs[2 % len(procs)]

        rows: list[tuple[str, str, str, dict[str, Any]]] = []
        # The embedded Gemma 3 270M is a base model (no instruction tuning, no chat template of
        # its own): asked completion-style it answers sensibly, in a chat it mostly rambles.
        q1 = "Q: What does a cache do in a computer?\nA:"
        q2 = "Q: What are the three primary colors?\nA: The three primary colors are"
        q3 = "The capital of France is"
        line = ["\n"]  # Q1 and Q2 answer in one line
        per_request_timeout = httpx.Timeout(max(5.0, min(300.0, deadline - time.monotonic())))
        with httpx.Client(timeout=per_request_timeout) as client:

            def step(node: Any, what: str, prompt: str, **kw: Any) -> None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the demo ran past --timeout {timeout:.0f} s")
                with err_console.status(f"{node.name}: {what} …"):
                    rows.append(
                        (
                            node.name,
                            what,
                            prompt,
                            _ask(client, node.url, model, prompt, max_tokens, **kw),
                        )
                    )

            step(n1, "Q1", q1, stop=line)
            step(n1, "Q1 again", q1, stop=line)
            if networked:  # wait (bounded) until node-1's advert for Q1 has reached node-2
                key = rows[0][3]["x"]["input_sha256"]
                with err_console.status(
                    f"{n2.name}: waiting for {n1.name}'s advertisement of Q1 …"
                ):
                    wait_s = max(0.0, min(30.0, deadline - time.monotonic()))
                    r = client.get(
                        f"{n2.url}/admin/providers",
                        params={"key": key, "wait_s": wait_s},
                        timeout=wait_s + 10,
                    )
                    heard = r.status_code == 200 and n1.peer_id in r.json().get("providers", [])
                if not heard:
                    err_console.print(
                        f"[yellow]{n2.name} has not heard of Q1 from {n1.name} yet; "
                        "it may compute it.[/]"
                    )
            step(n2, "Q1 (other node)", q1, stop=line)
            step(n2, "Q3", q3)
            step(n2, "Q3 again", q3)
            k = 8
            with err_console.status(f"{n3.name}: {k} identical requests at once …"):
                with ThreadPoolExecutor(k) as pool:
                    futures = [
                        pool.submit(_ask, client, n3.url, model, q2, max_tokens, stop=line)
                        for _ in range(k)
                    ]
                    results = [
                        f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures
                    ]
            for i, r in enumerate(results):
                rows.append((n3.name, f"Q2 at once {i + 1}/{k}", q2, r))
            step(n3, "Q2 streamed", q2, stream=True, stop=line)

        for name, q in (("Q1", q1), ("Q2", q2), ("Q3", q3)):
            out_console.print(f"{name}: {' / '.join(q.splitlines())}")
        _print_answers(rows)
        computed = sum(1 for *_, r in rows if r["level"] == "L3")
        l0 = [
            r["ms"]
            for *_, r in rows
            if r["level"] == "L0" and not (r["x"] or {}).get("single_flight")
        ]
        l3 = [r["ms"] for *_, r in rows if r["level"] == "L3"]
        out_console.print(
            f"{len(rows)} answers, {computed} computed by a model (L3); "
            + (
                f"L0 hits took {min(l0):.1f}-{max(l0):.1f} ms, "
                f"L3 answers {min(l3):.0f}-{max(l3):.0f} ms."
                if l0 and l3
                else ""
            )
        )
        q1_other = next((r for node, what, _p, r in rows if what == "Q1 (other node)"), None)
        if networked and q1_other is not None and q1_other["level"] == "L3":
            out_console.print(
                f"[dim]{n2.name} computed Q1 itself (L3): for an answer this short its cost model "
                f"found "
                f"computing cheaper than fetching and verifying {n1.name}'s "
                f"(try a larger --max-tokens).[/]"
            )
        if not networked:
            out_console.print(
                "[dim]These nodes run without the network layer (no p2p addresses), "
                "so node-2 computed "
                "node-1's question itself (L3); with it, that answer comes from the peer (L2).[/]"
            )
    except (NodeStartError, RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        raise fail(str(exc)) from None
    finally:
        if procs:
            with err_console.status("Stopping nodes …"):
                codes = stop_all(procs)
            bad = {k: v for k, v in codes.items() if v != 0}
            if bad:
                err_console.print(f"[red]nodes that did not stop cleanly: {bad}[/]")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
