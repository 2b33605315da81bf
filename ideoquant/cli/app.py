"""The `ideoquant` application: wiring, global options and the one exception formatter.

Exit codes: 0 success; 1 `verify` found problems; 2 bad input or usage; 3 an internal error (a bug: `--debug`
shows its traceback); 128 + the signal's number when interrupted: 130 Ctrl-C (SIGINT), 143 SIGTERM, 129 SIGHUP.
Each interruption cleans up as Ctrl-C does (staging removed, an existing OUT unchanged).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from ..errors import IdeoquantError
from . import render

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class KeptInterrupt(Exception):
    """An interrupt in a command that keeps its finished work (bench's images). Not a KeyboardInterrupt, so that
    typer does not turn it into a bare exit code: the interrupt's line says what was kept."""

    def __init__(self, signum: int, kept: str):
        super().__init__(kept)
        self.signum, self.kept = signum, kept


@contextlib.contextmanager
def interrupt_keeps(kept: str):
    """Around the work of a command that keeps what it finished when interrupted."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise KeptInterrupt(getattr(e, "signum", signal.SIGINT), kept) from e


@contextlib.contextmanager
def signals_as_interrupts():
    """For the command's duration (CLI only: the library never touches signal handling): SIGINT, SIGTERM and SIGHUP
    raise in the main thread. Only the first one does: a second signal does not interrupt the cleanup of the
    first. A signal the caller ignores (nohup) stays ignored."""
    fired: list[int] = []  # the signal received, for the exit code (typer turns the interrupt into a plain 130)
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def unraisable(info):
        # An interrupt can land inside a library's half-built object (llvmlite while numba compiles): its __del__
        # then fails as the stack unwinds. After an interrupt that is teardown noise, not a second error.
        if not fired:
            default_unraisable(info)

    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) is signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, handler)
    default_unraisable, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield fired
    finally:
        if not fired:  # after an interrupt the process is ending: its teardown noise stays quiet too
            sys.unraisablehook = default_unraisable
        for sig, h in previous.items():
            signal.signal(sig, h)


class _App(TyperGroup):
    """Every command's errors end here, also under typer's CliRunner: one line (or JSON with --json), an exit
    code, no traceback unless --debug."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        fired: list[int] = []
        as_json, debug = "--json" in args, "--debug" in args
        try:
            with signals_as_interrupts() as fired:
                rv = super().main(args, "ideoquant", complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else EXIT_OK
            if fired or code == EXIT_INTERRUPTED:  # typer returns 130 for any KeyboardInterrupt it caught
                code = self._interrupted(fired[0] if fired else signal.SIGINT, as_json)
        except typer.Exit as e:
            code = e.exit_code
            if fired or isinstance(e.__cause__, KeyboardInterrupt):
                code = self._interrupted(fired[0] if fired else signal.SIGINT, as_json)
        except typer.TyperException as e:  # usage: unknown option, bad choice, out of range, no command
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
                render.out_console.print(ctx.get_help(), markup=False, highlight=False)
            else:
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                render.error(e.format_message() + hint, as_json, EXIT_USAGE)
            code = EXIT_USAGE
        except (KeyboardInterrupt, typer.Abort) as e:
            code = self._interrupted(fired[0] if fired else getattr(e, "signum", signal.SIGINT), as_json)
        except KeptInterrupt as e:
            code = self._interrupted(fired[0] if fired else e.signum, as_json, e.kept)
        except IdeoquantError as e:
            render.error(str(e), as_json, EXIT_USAGE)
            code = EXIT_USAGE
        except OSError as e:  # the operating system said no: name the path and the cause
            render.error(os_error_line(e), as_json, EXIT_USAGE)
            code = EXIT_USAGE
        except Exception as e:  # noqa: BLE001  a bug: one line, the traceback on request
            if debug:
                raise
            render.error(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback and "
                         "report it)", as_json, EXIT_INTERNAL)
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _interrupted(signum: int, as_json: bool, kept: str | None = None) -> int:
        """Ctrl-C, SIGTERM or SIGHUP: the job has cleaned up by now. Exit code 128 + the signal's number. A command
        that keeps its finished work on an interrupt (bench's images) says so through the interrupt's `kept`."""
        signum = int(signum)
        code = 128 + signum
        done = kept or "nothing was written, an existing output is unchanged"
        render.error(f"interrupted ({signal.Signals(signum).name}): {done}", as_json, code)
        return code


def os_error_line(e: OSError) -> str:
    """One line naming the path(s) and the cause: `cannot write /x/y: Permission denied`."""
    cause = " ".join(str(e.strerror or e or type(e).__name__).split())
    if e.filename and e.filename2:
        line = f"{e.filename} -> {e.filename2}: {cause}"
    elif e.filename:
        line = f"{e.filename}: {cause}"
    else:
        line = f"{cause} ({type(e).__name__})"
    return " ".join(line.split())


app = typer.Typer(cls=_App, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Quantize Ideogram 4 for consumer GPUs: INT8 W8A8 for stock diffusers, bit-exact GGUF.")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        render.out_console.print(f"ideoquant {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an internal error.")] = False,
) -> None:
    """Quantize Ideogram 4 for consumer GPUs: INT8 W8A8 for stock diffusers, bit-exact GGUF."""


def quiet_third_party() -> None:
    """Import chatter of torchao's optional kernels and torch's pytree notices is not for our users: their loggers
    are raised to ERROR. Done without importing anything heavy, so `--help` stays fast."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers sets up its logger


def quiet_diffusers() -> None:
    """For the commands that load models through diffusers (and transformers, for text encoders and metric
    models): no per-shard loading or saving bars."""
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def job_runtime(switch_interval: float = 0.0005):
    """Interpreter settings for a conversion run from the command line (the library never changes them).

    - A 0.5 ms GIL switch interval: the encoder and hash threads need the GIL only briefly between their GIL-free
      kernel and sha256 calls; at Python's default 5 ms, a thread running Python keeps them waiting up to 5 ms
      each time (measured: 3% faster on a 12-layer conversion).
    - No cyclic garbage collection: torchao's import and the job's loops allocate enough to trigger repeated full
      collections over torch's heap; the job makes no cycles worth collecting (measured: 0.6 CPU-s less on a
      4-layer conversion, about 8% of its time).
    - One torch intra-op thread: the job's own workers encode independent row blocks; torch's pool on top of them
      only adds contention (used by `--device cuda` and SmoothQuant's torch path).
    """
    import torch

    before, collecting, threads = sys.getswitchinterval(), gc.isenabled(), torch.get_num_threads()
    sys.setswitchinterval(min(before, switch_interval))
    gc.disable()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(before)
        if collecting:
            gc.enable()


def main() -> None:
    """The console script. The process is ours here: quiet third-party chatter, and freeze the heap at the end
    (Python's shutdown would otherwise walk every object torch, torchao and numba made: ~1 s after a conversion,
    measured; output is complete by then)."""
    quiet_third_party()
    for module in ("torchao", "torch", "diffusers", "transformers", "accelerate"):
        warnings.filterwarnings("ignore", module=module)
    try:
        app()
    finally:
        gc.freeze()
