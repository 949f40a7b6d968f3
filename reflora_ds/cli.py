"""The ``reflora-ds`` command line: the only place that parses arguments."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="RefLoRA fine-tuning for PEFT models under DeepSpeed ZeRO 0-3.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root():
    """RefLoRA fine-tuning for PEFT models under DeepSpeed ZeRO 0-3."""


@app.command()
def toy(out: Path = typer.Option(Path("out/toy"), "--out", help="Folder for toy.json and toy.png."),
        iters: int = typer.Option(100, help="Gradient-descent iterations per run.")):
    """The paper's matrix-factorisation experiment: min ½‖BA − Y‖² with LoRA, ScaledGD, RefLoRA, RefLoRA-S."""
    from rich.console import Console
    from rich.table import Table

    from .toy import run_all

    result = run_all(out, iters)
    table = Table(title="½‖BA − Y‖²: iterations to reach 1e-3 and final loss")
    for col in ("method", "step size", "iters to 1e-3", f"loss after {iters}"):
        table.add_column(col)
    for run in result["runs"]:
        final = run["loss"][-1]
        table.add_row(run["method"], str(run["lr"]), str(run["iters_to_1e-3"] or "never"),
                      "diverged" if final is None else f"{final:.3g}")
    Console().print(table)
    typer.echo(f"wrote {out / 'toy.json'} and {out / 'toy.png'}")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
