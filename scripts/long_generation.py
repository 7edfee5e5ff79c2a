"""Long generation under a bound: greedy continuations per method and budget, against the full
cache's (:mod:`capkv.harness.long_generation`).

For each prompt (the opening of an essay and a request for a long continuation or summary, in
the chat template) the full cache and every method at every budget generate the same number of
greedy tokens, the prompt read in chunks and the cache compressed after each chunk and every
``--compress-every`` generated tokens. Writes under ``--results``: the rows (tokens and text of
every continuation, appended as each finishes; a rerun resumes), ``long_generation.csv`` (every
continuation against the full cache's: identical tokens before the first divergence, ROUGE-L on
tokens, peak and final cache tokens) and ``long_generation.md`` (the mean over prompts); and the
figure ``<model>_long_generation.png`` under ``--plots``.

    .venv/bin/python scripts/long_generation.py      # the committed results (make reproduce-streaming)
    .venv/bin/python scripts/long_generation.py --prompts 1 --new-tokens 32 \\
        --methods capkv --budgets 256 --results /tmp/lg --plots /tmp/lg   # a check in a minute

With the defaults (2 prompts of about 1.6k tokens, 512 new tokens, 5 methods x 3 budgets and the
full cache: 32 continuations) it takes about 35 minutes on one CPU thread of this project's
machine (about 70 s per continuation, measured while the machine was shared). ``--prompts 1``
halves that; running the defaults afterwards resumes and adds the second prompt's cells.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from capkv.engine.budget import Budget
from capkv.figures.long_generation import long_generation_figure
from capkv.harness.cli import CONF_DIR, group_options
from capkv.harness.long_generation import (
    FULL,
    LongGenerationSettings,
    displayed,
    essay_prompts,
    run_comparison,
    write_tables,
)
from capkv.results.format import markdown

METHODS = ["capkv", "snapkv", "pyramidkv", "h2o", "streamingllm"]


def conf(group: str, name: str):
    """The object ``conf/<group>/<name>.yaml`` instantiates; an unknown name is refused."""
    if name not in group_options(group):
        raise ValueError(
            f"unknown {group} {name!r}; choose one of: {', '.join(group_options(group))}."
        )
    return instantiate(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="conf/model name")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="conf/method names")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--prompts", type=int, default=2, help="essays, one prompt each")
    parser.add_argument("--context-tokens", type=int, default=1536, help="excerpt length at most")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--compress-every", type=int, default=64)
    parser.add_argument("--results", type=Path, default=Path("results/streaming"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/long_generation.py", *(argv or sys.argv[1:])])
    try:
        settings = LongGenerationSettings(
            args.model, args.context_tokens, args.new_tokens, args.chunk, args.compress_every
        )
        methods = {name: conf("method", name) for name in dict.fromkeys([FULL, *args.methods])}
        for method in methods.values():
            for budget in args.budgets:
                method.check_budget(Budget(tokens=budget))
        model, tokenizer = conf("model", args.model).load()
        prompts = essay_prompts(tokenizer, args.prompts, args.context_tokens)
        rows = run_comparison(
            model,
            tokenizer,
            prompts,
            methods,
            args.budgets,
            settings,
            args.results,
            progress=lambda cells: tqdm(cells, desc="continuations", unit="continuation"),
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the finished continuations are in {args.results}; rerun to resume.")
    _, summary = write_tables(rows, settings, args.results, command)
    prompts_done = summary["prompts"].max() if not summary.empty else 0
    title = (
        f"{args.model}: {args.new_tokens}-token greedy continuations under a bound "
        f"(chunk {args.chunk}, compressed every {args.compress_every} tokens), "
        f"mean of {prompts_done} prompt(s)"
    )
    args.plots.mkdir(parents=True, exist_ok=True)
    figure = long_generation_figure(summary, title)
    figure.savefig(args.plots / f"{args.model}_long_generation.png", dpi=130)
    print(markdown(displayed(summary), {"rouge_l": 3, "seconds": 1}))


if __name__ == "__main__":
    main()
