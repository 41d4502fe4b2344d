"""``lorafit submit``: render one of the sbatch templates in ``slurm/`` and submit it (or print it).

The templates are complete sbatch scripts (``sbatch slurm/train_single_node.sbatch CONFIG`` works
on its own); this verb rewrites their ``#SBATCH`` header from command-line options, keeps the
rendered script under ``<runs>/submit/`` for the record, and calls ``sbatch``. The job then runs
``srun lorafit fit --config CONFIG --config configs/trainer/slurm.yaml ...`` with one task per GPU
(``--ntasks-per-node`` = ``trainer.devices``), in the run directory ``<runs>/<job name>-<job id>``.

Unlike the other verbs this one parses its own arguments with argparse (``--config`` may repeat,
and everything after ``--`` goes to ``lorafit fit`` unchanged). Its options are spelled with
underscores like every other verb's (``--gpus_per_node``, ``--dry_run``); the dashed spellings of
earlier versions (sbatch's, ``--gpus-per-node``) still work and print a one-line notice.

Nothing a user types is executed by the job's shell: every value is checked (no newline or other
control character, which would start a new script line or cut off later ``#SBATCH`` lines; no
blank or quote in a ``#SBATCH`` value, which sbatch would split), and the one value that reaches
shell code, ``--runs_dir``, is quoted with :func:`shlex.quote`. Configs and ``lorafit fit``
arguments are passed to sbatch as an argument list, never through a shell.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.submit")

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = {"single": "train_single_node.sbatch", "multi": "train_multi_node.sbatch"}
OVERLAY = "configs/trainer/slurm.yaml"
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")  # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
# Any C0 control character or DEL: a newline would end the #SBATCH line (or the shell line) early.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What may not appear in a #SBATCH value: sbatch splits the directive at blanks, strips quotes and
# ends it at '#'. SLURM's own names (partitions, accounts, QOS) never contain these.
_HEADER_UNSAFE = re.compile(r"[\s'\"#\\]")
# Environment variable the job exports when `--allow_pipe` is given; see lorafit/data/pipe_policy.py.
ALLOW_PIPE_ENV = "LORAFIT_ALLOW_PIPE"


@dataclass
class SubmitOptions:
    """What ``lorafit submit`` puts into the sbatch header and the ``lorafit fit`` command."""

    configs: list[str]
    nodes: int = 1
    gpus_per_node: int = 1
    cpu: bool = False
    ntasks_per_node: int | None = None
    cpus_per_task: int = 8
    job_name: str = "lorafit"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    signal_seconds: int = 90
    runs_dir: str = "runs"
    sbatch_options: list[str] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    template: str | None = None
    allow_pipe: bool = False

    @property
    def tasks_per_node(self) -> int:
        """One task per device: GPUs on a GPU node, ``--ntasks_per_node`` CPU processes with ``--cpu``."""
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return 1 if self.cpu else self.gpus_per_node


def _check_text(flag: str, value: str, in_header: bool) -> None:
    """One line for a value that could change the script beyond its own option."""
    if _CONTROL.search(value):
        raise LorafitError(
            f"{flag} {value!r} contains a newline or another control character; it would add lines to the job script"
        )
    if in_header and _HEADER_UNSAFE.search(value):
        raise LorafitError(
            f"{flag} {value!r} contains a blank, quote, backslash or '#', which sbatch would split or cut "
            "in the #SBATCH line; give the value without them"
        )


def _check_values(options: SubmitOptions) -> None:
    for name in ("partition", "time", "account", "qos", "mem", "runs_dir"):
        value = getattr(options, name)
        if value is not None:
            _check_text(f"--{name}", value, in_header=True)
    for value in options.sbatch_options:
        _check_text("--sbatch", value, in_header=True)
    for value in options.configs:
        _check_text("--config", value, in_header=False)
    if options.template is not None:
        _check_text("--template", options.template, in_header=False)


def _check(options: SubmitOptions) -> None:
    if not options.configs:
        raise LorafitError("lorafit submit needs --config CONFIG.yaml (the config `lorafit fit` trains with)")
    _check_values(options)
    for config in options.configs:
        if not Path(config).is_file():
            raise LorafitError(f"--config {config} does not exist")
    for name in ("nodes", "gpus_per_node", "cpus_per_task", "signal_seconds"):
        if getattr(options, name) < (0 if name == "gpus_per_node" and options.cpu else 1):
            raise LorafitError(f"--{name} is {getattr(options, name)}; use 1 or more")
    if options.ntasks_per_node is not None and options.ntasks_per_node < 1:
        raise LorafitError(f"--ntasks_per_node is {options.ntasks_per_node}; use 1 or more")
    if not options.cpu and options.ntasks_per_node not in (None, options.gpus_per_node):
        raise LorafitError(
            f"--ntasks_per_node {options.ntasks_per_node} differs from --gpus_per_node "
            f"{options.gpus_per_node}; Lightning's DDP needs one task per GPU"
        )
    if options.time is not None and not _TIME.match(options.time):
        raise LorafitError(f"--time {options.time!r} is not a SLURM time; use e.g. 90, 4:00:00 or 1-12:00:00")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", options.job_name):
        raise LorafitError(
            f"--job_name {options.job_name!r}: use letters, digits, '.', '_' and '-' (it names the run dir)"
        )


def template_path(options: SubmitOptions) -> Path:
    """The template to render: ``--template``, else single- or multi-node by ``--nodes``."""
    path = (
        Path(options.template)
        if options.template
        else REPO / "slurm" / TEMPLATES["multi" if options.nodes > 1 else "single"]
    )
    if not path.is_file():
        raise LorafitError(
            f"sbatch template {path} not found; pass --template path/to/slurm/<template>.sbatch "
            "(the templates live in the slurm/ folder of the lorafit repository)"
        )
    return path


def sbatch_header(options: SubmitOptions) -> list[str]:
    """The ``#SBATCH`` lines for ``options``, in sbatch's own spelling."""
    lines = [
        f"--job-name={options.job_name}",
        f"--nodes={options.nodes}",
        f"--ntasks-per-node={options.tasks_per_node}",
    ]
    if not options.cpu:
        lines.append(f"--gpus-per-node={options.gpus_per_node}")
    lines.append(f"--cpus-per-task={options.cpus_per_task}")
    for name in ("partition", "time", "account", "qos", "mem"):
        value = getattr(options, name)
        if value is not None:
            lines.append(f"--{name}={value}")
    lines += [
        # Lightning needs the warning signal in the training processes (not "B:", the batch shell).
        f"--signal=SIGUSR1@{options.signal_seconds}",
        "--requeue",
        "--open-mode=append",  # a requeued job appends to its log instead of truncating it
        f"--output={options.runs_dir}/slurm-%x-%j.out",
    ]
    lines += [o if o.startswith("-") else f"--{o}" for o in options.sbatch_options]
    return [f"#SBATCH {line}" for line in lines]


def render(options: SubmitOptions) -> str:
    """The template with its ``#SBATCH`` block replaced by :func:`sbatch_header`.

    In the body, the defaults of the runs directory and of the SLURM overlay become ``--runs_dir``
    and the overlay's absolute path, so the job finds them whatever directory it was submitted from.
    Both are shell-quoted: the body is shell code, and ``${VAR:-word}`` would run a ``$(...)`` in
    an unquoted word.
    """
    _check(options)
    lines = template_path(options).read_text().splitlines()
    directive = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not directive:
        raise LorafitError(f"{template_path(options)} has no #SBATCH lines to fill in")
    first, last = directive[0], directive[-1]
    body = "\n".join(lines[last + 1 :])
    body = body.replace("${LORAFIT_RUNS:-runs}", f"${{LORAFIT_RUNS:-{shlex.quote(options.runs_dir)}}}")
    overlay = shlex.quote(str(REPO / OVERLAY))
    body = body.replace(f"${{LORAFIT_SLURM_OVERLAY:-{OVERLAY}}}", f"${{LORAFIT_SLURM_OVERLAY:-{overlay}}}")
    if options.allow_pipe:
        body = f"export {ALLOW_PIPE_ENV}=1  # lorafit submit --allow_pipe: data.shards may run pipe: commands\n{body}"
    return "\n".join([*lines[:first], *sbatch_header(options), body]) + "\n"


def script_arguments(options: SubmitOptions) -> list[str]:
    """Arguments after the script on the sbatch line: the first config, then ``lorafit fit`` args."""
    first, *more = [str(Path(c).resolve()) for c in options.configs]
    extra = [arg for config in more for arg in ("--config", config)]
    return [first, *extra, *options.fit_args]


def submit_options(options: SubmitOptions, dry_run: bool = False, sbatch: str = "sbatch") -> str | None:
    """Render the script; print it (``dry_run``) or save it under ``<runs>/submit/`` and submit it.

    Returns:
        The job id, or None for a dry run.
    """
    script = render(options)
    arguments = script_arguments(options)
    if dry_run:
        print(script, end="")
        print(f"# submit with: sbatch <this script> {shlex.join(arguments)}")
        return None
    if shutil.which(sbatch) is None:
        raise LorafitError(f"`{sbatch}` not found: run lorafit submit on a SLURM login node, or use --dry_run")
    runs = Path(options.runs_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs / "submit" / f"{options.job_name}-{stamp}.sbatch"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # sbatch cannot create the --output directory
        path.write_text(script)
    except OSError as error:
        raise LorafitError(
            f"cannot write the job script to {path} ({error.strerror}); choose a writable --runs_dir"
        ) from None
    result = subprocess.run([sbatch, "--parsable", str(path), *arguments], check=False, capture_output=True, text=True)
    if result.returncode:
        raise LorafitError(f"sbatch refused {path}: {' '.join(result.stderr.split())}")
    job = result.stdout.strip().split(";")[0]
    print(
        f"submitted job {job}: script {path}, log {runs}/slurm-{options.job_name}-{job}.out, "
        f"run dir {runs}/{options.job_name}-{job}"
    )
    return job


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit submit",
        description="Render a SLURM sbatch script for `lorafit fit` (slurm/ templates) and submit it. "
        "Arguments after `--` go to `lorafit fit`.",
        exit_on_error=False,  # lorafit's main() prints a bad option as one line
    )
    add = parser.add_argument
    add(
        "--config",
        action="append",
        dest="configs",
        default=[],
        metavar="YAML",
        help="lorafit fit config; repeat to compose (later files override earlier ones)",
    )
    add("--nodes", type=int, default=1, help="nodes (more than 1 selects the multi-node template)")
    add("--gpus_per_node", type=int, default=1, help="GPUs per node = tasks per node = trainer.devices")
    add(
        "--cpu", action="store_true", help="no GPUs: --ntasks_per_node CPU processes (gloo DDP), e.g. to test a cluster"
    )
    add("--ntasks_per_node", type=int, help="tasks per node; defaults to --gpus_per_node (1 with --cpu)")
    add("--cpus_per_task", type=int, default=8, help="CPU cores per task (data loading workers)")
    add("--job_name", default="lorafit", help="job name; the run dir is <runs>/<job name>-<job id>")
    add("--partition", help="SLURM partition")
    add("--time", help="time limit, e.g. 4:00:00 or 1-00:00:00; SIGUSR1 comes --signal_seconds before it")
    add("--account", help="SLURM account to charge")
    add("--qos", help="SLURM quality of service")
    add("--mem", help="memory per node, e.g. 64G")
    add(
        "--signal_seconds",
        type=int,
        default=90,
        help="send SIGUSR1 this many seconds before the time limit: checkpoint and requeue",
    )
    add("--runs_dir", default="runs", help="where run directories and job logs go")
    add(
        "--sbatch",
        action="append",
        dest="sbatch_options",
        default=[],
        metavar="OPTION",
        help="any other sbatch option, e.g. --sbatch=--exclusive --sbatch=--constraint=a100 (repeatable)",
    )
    add("--template", help="an sbatch template of your own instead of slurm/train_*_node.sbatch")
    add(
        "--allow_pipe",
        action="store_true",
        help="let the job read data.shards/data.val_shards given as pipe: commands (refused in jobs otherwise)",
    )
    add("--dry_run", action="store_true", help="print the script and the sbatch command; submit nothing")
    return parser


def underscore_spellings(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--gpus-per-node 4`` -> ``--gpus_per_node 4``, with a one-line notice per old spelling.

    Earlier versions spelled these options with dashes, as sbatch does; every other lorafit verb
    uses underscores (its options are the function's parameter names, as kohya spells its own).
    Only option names of this parser are rewritten, never a value such as ``--sbatch=--exclusive``.
    """
    known = {flag for action in parser._actions for flag in action.option_strings}
    rewritten = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        new = "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag
        if new != flag and new in known:
            log.warning("%s is now spelled %s (the old spelling still works)", flag, new)
            arg = new + equals + value
        rewritten.append(arg)
    return rewritten


def main(argv: list[str]) -> str | None:
    """Entry point of ``lorafit submit`` (argv without the verb)."""
    fit_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, fit_args = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    namespace, unknown = parser.parse_known_args(underscore_spellings(argv, parser))
    if unknown:
        raise LorafitError(
            f"lorafit submit: unknown option(s) {' '.join(unknown)}; put `lorafit fit` arguments after `--`"
        )
    values = vars(namespace)
    dry_run = values.pop("dry_run")
    return submit_options(SubmitOptions(**values, fit_args=fit_args), dry_run=dry_run)


main.parses_own_args = True  # lorafit.cli.run_tool hands it argv instead of building a jsonargparse CLI

if __name__ == "__main__":
    main(sys.argv[1:])
