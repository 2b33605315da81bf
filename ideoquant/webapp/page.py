"""The browser app (`ideoquant app`, or a Hugging Face Space): a Gradio Blocks page over `webapp.jobs`.

Sign in with Hugging Face (Gradio's LoginButton: OAuth in a Space; run locally, Gradio stubs the sign-in and the jobs
use the local token, HF_TOKEN or `hf auth login`, against HF_ENDPOINT as every huggingface_hub tool does). One job runs
at a time per machine (Gradio's queue, concurrency 1: the others see their position); `/convert` is the same job
for `gradio_client`.
"""

from __future__ import annotations

import html
import os
import tempfile
import threading
from pathlib import Path

import gradio as gr

from .. import model
from ..formats import catalog
from ..formatting import human_bytes
from . import jobs

TITLE = "ideoquant: Ideogram 4 to INT8 and GGUF, on the Hub"
INTRO = (f"Converts both Ideogram 4 backbones from a Hub repo (default `{model.DEFAULT_SOURCE}`, gated: accept its "
         "licence first) to INT8 W8A8 (stock diffusers + torchao) and any GGUF types, in one pass, streaming a block "
         "of rows at a time; verifies every output, then uploads them all to a new repo of yours in one commit "
         "(one folder per output, each with its `ideoquant.json`, one model card listing them).")
OUTPUT_CHOICES = [("INT8 W8A8 (torchao)", jobs.INT8)] + [(t.upper(), t) for t in catalog.GGUF_CHOICES]
PHASES = {"queued": "waiting", "checking": "checking the source, the target and the disk",
          "converting": "converting", "verifying": "verifying the outputs", "uploading": "uploading (one commit)",
          "done": "done", "failed": "failed", "stopped": "stopped"}
POLL_SECONDS = 0.25
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads offline too


def in_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def _user_token(oauth_token) -> str | None:
    """In a Space, the signed-in user's OAuth token and nothing else (never the Space's own secrets); run locally,
    the machine's token (HF_TOKEN or `hf auth login`): Gradio's local sign-in stub hands out no usable token."""
    if in_space():
        return getattr(oauth_token, "token", None)
    from huggingface_hub import get_token

    return get_token()


def _user_name(profile, token: str | None) -> str | None:
    if profile is not None:
        return profile.username
    if token is None:
        return None
    from huggingface_hub import whoami

    try:
        return whoami(token)["name"]
    except Exception:  # noqa: BLE001  no name, no default target: the job's own checks say what is wrong
        return None


def _rows_html(snapshot: dict) -> str:
    rows = snapshot["rows"]
    if not rows:
        return ""
    out = ['<table class="iq-progress"><tr><th>output · backbone</th><th>progress</th><th>done</th><th>speed</th>'
           '<th>ETA</th></tr>']
    for r in rows:
        rate, eta = r.rate(), r.eta()
        frac = r.done / r.total if r.total else 1.0
        out.append(f'<tr data-fraction="{frac:.4f}"><td>{html.escape(r.label)}</td>'
                   f'<td><progress value="{r.done}" max="{max(r.total, 1)}"></progress> {100 * frac:.0f}%</td>'
                   f"<td>{human_bytes(r.done)} / {human_bytes(r.total)}</td>"
                   f"<td>{human_bytes(rate) + '/s' if rate else '?'}</td>"
                   f"<td>{'-' if r.finished else (f'{eta:.0f} s' if eta is not None else '?')}</td></tr>")
    return "".join(out) + "</table>"


def _summary_md(snapshot: dict) -> str:
    result = snapshot["result"]
    lines = []
    if snapshot["verified"]:
        lines.append("**Verify** (before the upload):")
        for name, checks in snapshot["verified"].items():
            bad = [c for c in checks if c.startswith("FAIL")]
            lines.append(f"- `{name}/`: " + ("verified, " + "; ".join(c[3:] for c in checks) if not bad
                                             else "; ".join(bad)))
    if result:
        sizes = {}
        for f in result["files"]:
            top = f["path"].split("/")[0] if "/" in f["path"] else None
            if top:
                sizes[top] = sizes.get(top, 0) + f["size"]
        lines += ["", "| output | size |", "| --- | ---: |"]
        lines += [f"| `{k}/` | {human_bytes(v)} |" for k, v in sizes.items()]
    return "\n".join(lines)


def _status_md(snapshot: dict) -> str:
    phase = snapshot["phase"]
    if phase == "stopped":
        return f"**stopped:** {snapshot['error']}"
    if snapshot["error"]:
        return f"**error:** {snapshot['error']}"
    if phase == "done":
        r = snapshot["result"]
        return (f"**done** in {snapshot['elapsed']:.0f} s: [{r['repo_id']}]({r['url']}) "
                f"({'private' if r['private'] else 'public'}; its model card lists every output)")
    return f"**{PHASES.get(phase, phase)}** ({snapshot['elapsed']:.0f} s)"


def _result_html(snapshot: dict) -> str:
    r = snapshot["result"]
    if not r:
        return ""
    return (f'<p>New repo: <a id="iq-result-link" href="{html.escape(r["url"])}" target="_blank">'
            f'{html.escape(r["repo_id"])}</a> (model card: README.md)</p>')


def build(*, work_dir: str | Path | None = None, disk_budget: int | None = None, time_limit: float | None = None,
          threads: int | None = None) -> gr.Blocks:
    """The page. work_dir: where jobs write (a folder per job, removed after it); disk_budget: at most this many
    bytes per job (besides the disk's free space); time_limit: seconds before a job is stopped."""
    work_root = Path(work_dir or tempfile.gettempdir()) / "ideoquant-app"
    running: dict[str, jobs.Job] = {}  # session -> its running job (for Cancel)
    slot = threading.Lock()  # one job per machine, its cleanup included
    local = not in_space()
    can_sign_in = not local or _user_token(None) is not None  # Gradio's local stub needs a local token

    def suggest_target(source, profile: gr.OAuthProfile | None):
        user = profile.username if profile is not None else (_user_name(None, _user_token(None)) if local else None)
        return gr.update(placeholder=jobs.default_target(user, source) or "ORG/NAME")

    def convert(source: str, outputs: list[str], target: str, private: bool, imatrix: str | None = None,
                profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None,
                request: gr.Request = None):
        token = _user_token(oauth_token)
        if token is None:
            yield ("**error:** sign in with Hugging Face first" + (" (run locally: `hf auth login` or set HF_TOKEN, "
                                                                  "then restart the app)" if local else ""),
                   "", "", "", "")
            return
        target = (target or "").strip() or jobs.default_target(_user_name(profile, token), source)
        request_ = jobs.Request(source, list(outputs or []), target, bool(private),
                                str(imatrix) if imatrix else None)
        session = getattr(request, "session_hash", None) or "api"
        with slot:
            job = jobs.Job(request_, token, work_root, disk_budget=disk_budget, time_limit=time_limit,
                           threads=threads)
            running[session] = job
            try:
                job.start()
                while not job.wait(POLL_SECONDS):
                    yield (*_view(job.snapshot()), gr.update())
                snap = job.snapshot()
            finally:
                running.pop(session, None)
        yield (*_view(snap), "")  # the outcome replaces Cancel's note

    def cancel(request: gr.Request = None):
        job = running.get(getattr(request, "session_hash", None) or "api")
        if job is None:
            return "**nothing to cancel** (no job of yours is running)"
        if job.cancel():
            return "**cancelling** (like Ctrl-C: work files are removed, nothing is uploaded)"
        return "**too late to cancel**: the job is finishing"

    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:  # uploaded imatrix files: an hour
        gr.Markdown(f"# {TITLE}\n\n{INTRO}")
        if can_sign_in:
            gr.LoginButton()
        else:
            gr.Markdown("**No Hub token on this machine:** run `hf auth login` or set `HF_TOKEN`, then restart "
                        "`ideoquant app`.")
        with gr.Row():
            source = gr.Textbox(label="Source repo", value=model.DEFAULT_SOURCE, elem_id="iq-source")
            target = gr.Textbox(label="Target repo (new; empty: <you>/<source>-ideoquant)", elem_id="iq-target")
        outputs = gr.CheckboxGroup(OUTPUT_CHOICES, value=[jobs.INT8, "q4_k_m"], label="Outputs (one pass)",
                                   info=f"Only stable-diffusion.cpp reads {', '.join(catalog.GGUF_SDCPP_ONLY)}.",
                                   elem_id="iq-outputs")
        with gr.Row():
            private = gr.Checkbox(label="Private repo", value=False, elem_id="iq-private")
            imatrix = gr.File(label="Importance matrix (optional: llama.cpp .gguf / .dat, or sd-cli's)",
                              type="filepath", elem_id="iq-imatrix")
        with gr.Row():
            run = gr.Button("Convert and upload", variant="primary", elem_id="iq-run")
            stop = gr.Button("Cancel", variant="stop", elem_id="iq-cancel")
        status = gr.Markdown(elem_id="iq-status")
        progress = gr.HTML(elem_id="iq-progress")
        summary = gr.Markdown(elem_id="iq-summary")
        result = gr.HTML(elem_id="iq-result")
        note = gr.Markdown(elem_id="iq-note")

        demo.load(suggest_target, [source], [target])
        source.change(suggest_target, [source], [target])
        # Outcomes, errors included, are the page's status line (the API's first value), not an exception: Gradio
        # would draw an error badge over every output and hide the one message.
        run.click(convert, [source, outputs, target, private, imatrix], [status, progress, summary, result, note],
                  api_name="convert", concurrency_limit=1, concurrency_id="job")
        stop.click(cancel, None, [note], api_name="cancel", queue=False)
    return demo


def _view(snapshot: dict) -> tuple[str, str, str, str]:
    return _status_md(snapshot), _rows_html(snapshot), _summary_md(snapshot), _result_html(snapshot)


def launch(*, host: str = "127.0.0.1", port: int | None = None, **options) -> None:
    """Serve the page until interrupted; a job still running then is cancelled and cleaned up first."""
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    try:
        build(**options).queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, theme=theme, ssr_mode=False, footer_links=["api"], show_error=True)
    finally:
        jobs.stop_all()
