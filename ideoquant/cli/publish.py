"""`ideoquant verify` and `ideoquant upload`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import render
from .app import EXIT_OK, EXIT_PROBLEMS, app, quiet_diffusers
from .options import Json, Token


Folder = Annotated[Path, typer.Argument(metavar="FOLDER", help="An ideoquant output folder.", show_default=False)]


@app.command()
def verify(
    folder: Folder,
    load: Annotated[bool, typer.Option(help="Also load each component.")] = True,
    as_json: Json = False,
):
    """Check an output folder against its manifest: files, hashes, loadability, recipe. Exit 1 when something is
    wrong."""
    quiet_diffusers()
    from ..publish.verify import verify as api

    result = api(folder, load=load)
    if as_json:
        render.print_json(result.to_dict())
    else:
        for c in result.checks:
            render.out_console.print(f"[green]ok[/green]   {c}", highlight=False)
        for p in result.problems:
            render.out_console.print(f"[red]FAIL[/red] {p}", highlight=False)
        render.out_console.print("[green]verified[/green]" if result.ok
                                 else f"[red]{len(result.problems)} problem(s)[/red]")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


@app.command()
def upload(
    folder: Folder,
    repo_id: Annotated[str, typer.Option("--repo-id", metavar="ORG/NAME", help="ORG/NAME on the Hub.", show_default=False)],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(metavar="BRANCH", help="Branch to commit to (created if missing).",
                                                    show_default=False)] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing to the branch.")] = False,
    commit_message: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Commit message.", show_default=False)] = None,
    keep_card: Annotated[bool, typer.Option(
        help="Keep the folder's own README.md instead of writing a model card.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Show files and the model card; send nothing.")] = False,
    base: Annotated[Optional[str], typer.Option(metavar="PIPELINE", help=render.BASE_HELP + " Named in the model card's code.",
                                                show_default=False)] = None,
    bench: Annotated[Optional[Path], typer.Option(
        metavar="REPORT", help="An `ideoquant bench` report folder: its summary table and an image grid go into the "
                               "model card.", show_default=False)] = None,
    token: Token = None,
    as_json: Json = False,
):
    """Upload an output folder to the Hub in one commit, with a model card (verified before anything is sent)."""
    quiet_diffusers()
    from ..bench.report import card_section
    from ..publish.upload import upload as api

    section = card_section(bench) if bench is not None else None
    result = api(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                 commit_message=commit_message, dry_run=dry_run, keep_card=keep_card, token=token,
                 progress=not as_json, base=base, bench=section)
    if as_json:
        return render.print_json(result)
    t = Table(title=("dry run: would upload" if dry_run else "uploaded") + f" to {repo_id}", title_justify="left")
    t.add_column("file")
    t.add_column("size", justify="right")
    for f in result["files"]:
        t.add_row(f["path"], render.human_bytes(f["size"]))
    render.out_console.print(t)
    if dry_run:
        render.out_console.rule("README.md")
        render.out_console.print(result["card"], markup=False, highlight=False)
    else:
        render.out_console.print(result.get("pr_url") or result.get("commit_url") or "")
