"""`p2pcache`: run a cached generation, inspect the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import trio
import typer

from p2pcache.backend import ModelNotFound, PromptTooLong
from p2pcache.cli import cache, chat, demo, net, node
from p2pcache.cli.common import (
    DataDirOpt,
    JsonOpt,
    err_console,
    fail,
    out_console,
    print_json,
    setup_logging,
)
from p2pcache.cli.progress import progress_bars
from p2pcache.keys import SamplingParams
from p2pcache.local import LocalNode, NodeOptions
from p2pcache.resolver import Answer, Request

app = typer.Typer(
    name="p2pcache",
    help="p2pcache (Open Transformer DB): never compute the same LLM answer twice.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(cache.app, name="cache")
app.command(name="chat")(chat.chat)
app.add_typer(node.app, name="node")
app.command(name="demo")(demo.demo)
app.command(name="peers")(net.peers)
app.command(name="reputation")(net.reputation)

ModelOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model",
        envvar="P2PCACHE_MODEL",
        help="GGUF model file (default: the embedded Gemma 3 270M Q4_K_M).",
    ),
]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs on stderr.")] = False,
) -> None:
    setup_logging(verbose)


def _summary(a: Answer) -> str:
    t = a.timings
    parts = [
        f"[bold]{a.cache_level}[/]",
        f"{t.prompt_tokens} prompt + {t.completion_tokens} completion tokens",
    ]
    if a.cache_level == "L3":
        if t.cached_prompt_tokens:
            parts.append(f"{t.cached_prompt_tokens} prompt tokens restored from stored KV")
        parts += [f"prefill {t.prefill_ms:.0f} ms", f"decode {t.decode_ms:.0f} ms"]
    if a.semantic is not None:  # a paraphrase's answer: say how similar and what the gate saw
        gate = a.semantic.gate or {}
        parts.append(f"similarity {a.semantic.similarity:.3f}")
        if gate.get("delta") is not None:
            parts.append(f"gate Δlogprob {gate['delta']:+.2f}/token")
    parts += [f"total {t.total_ms:.2f} ms", f"key {a.input_sha256[:12]}"]
    return " · ".join(parts)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message with --chat).")],
    model: ModelOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate at most.")
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option(min=0)] = 40,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for sampled output (reproducible).")] = 0,
    stop: Annotated[
        Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (with --chat).")] = None,
    share: Annotated[
        bool,
        typer.Option("--share/--private", help="Let peers have this entry (default: private)."),
    ] = False,
    semantic: Annotated[
        bool,
        typer.Option(
            "--semantic", help="Allow L1: reuse a paraphrase's answer if the quality gate agrees."
        ),
    ] = False,
    tau: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="L1 similarity threshold.")
    ] = None,
    n_ctx: Annotated[
        int, typer.Option("--n-ctx", min=256, help="Context window in tokens.")
    ] = NodeOptions.n_ctx,
    kv_type: Annotated[
        str, typer.Option("--kv-type", help="KV cache type: f16, q8_0, q4_0 (part of kv_config).")
    ] = NodeOptions.kv_type,
    data_dir: DataDirOpt = None,
    json: JsonOpt = False,
) -> None:
    """Answer PROMPT from the cache if any level has it, else run the model and store it."""
    try:
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        request = Request(messages=tuple(messages), params=params, share=share, semantic=semantic)
    elif system:
        raise fail("--system needs --chat")
    else:
        request = Request(prompt=prompt, params=params, share=share, semantic=semantic)

    try:
        with progress_bars(err_console) as progress, err_console.status("Loading model…"):
            node = LocalNode.open(
                NodeOptions(
                    data_dir=data_dir,
                    model=model,
                    n_ctx=n_ctx,
                    semantic=semantic,
                    semantic_tau=tau,
                    kv_type=kv_type,
                ),
                progress,
            )
    except (ModelNotFound, ValueError) as exc:
        raise fail(str(exc)) from None
    with node:
        try:
            answer = trio.run(node.resolve, request)
        except (PromptTooLong, ValueError) as exc:
            raise fail(str(exc)) from None
    if json:
        print_json(answer.to_dict() | {"cache_level": answer.cache_level})
        return
    out_console.print(answer.text, markup=False, highlight=False)
    err_console.print(_summary(answer), style="dim")


if __name__ == "__main__":  # pragma: no cover
    app()
