"""`p2pcache chat`: a multi-turn conversation; every turn resumes from the previous one's KV.

Each turn re-sends the whole history (as any chat API does); the resolver finds the history's
KV chunks stored by the previous turn and prefills only the new message. Reads one user
message per line from stdin, so it works interactively and piped:

    printf 'Hi, who are you?\\nSay that again, shorter.\\n' | p2pcache chat
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import trio
import typer

from p2pcache.backend import ModelNotFound, PromptTooLong
from p2pcache.cli.common import DataDirOpt, JsonOpt, err_console, fail, out_console, print_json
from p2pcache.cli.progress import progress_bars
from p2pcache.keys import SamplingParams
from p2pcache.local import LocalNode, NodeOptions
from p2pcache.resolver import Answer, Request


def _turn_summary(a: Answer) -> str:
    t = a.timings
    return (
        f"{a.cache_level} · {t.prompt_tokens} prompt tokens "
        f"({t.cached_prompt_tokens} restored from "
        f"stored KV) · prefill {t.prefill_ms:.0f} ms · decode {t.decode_ms:.0f} ms"
    )


def chat(
    model: Annotated[
        Optional[Path], typer.Option("--model", envvar="P2PCACHE_MODEL", help="GGUF model file.")
    ] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    share: Annotated[bool, typer.Option("--share/--private")] = False,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=256)] = NodeOptions.n_ctx,
    kv_type: Annotated[
        str, typer.Option("--kv-type", help="KV cache type: f16, q8_0, q4_0.")
    ] = NodeOptions.kv_type,
    data_dir: DataDirOpt = None,
    json: JsonOpt = False,
) -> None:
    """Chat on stdin, one message per line; each turn reuses the previous turn's KV state."""
    try:
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens)
        options = NodeOptions(data_dir=data_dir, model=model, n_ctx=n_ctx, kv_type=kv_type)
        with progress_bars(err_console) as progress, err_console.status("Loading model…"):
            node = LocalNode.open(options, progress)
    except (ModelNotFound, ValueError) as exc:
        raise fail(str(exc)) from None
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    with node:
        while True:
            if interactive:
                err_console.print("[bold]you>[/] ", end="")
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            try:
                answer = trio.run(
                    node.resolve, Request(messages=tuple(messages), params=params, share=share)
                )
            except (PromptTooLong, ValueError) as exc:
                raise fail(str(exc)) from None
            messages.append({"role": "assistant", "content": answer.text})
            if json:
                print_json(answer.to_dict())
            else:
                out_console.print(answer.text, markup=False, highlight=False)
                err_console.print(_turn_summary(answer), style="dim")
