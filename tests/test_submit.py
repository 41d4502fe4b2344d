"""`lorafit submit`: every option lands in the rendered sbatch script; bad options get one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cli_runs import REPO

from lorafit.cli import main
from lorafit.slurm.submit import SubmitOptions, render

CONFIG = str(REPO / "configs" / "sd15.yaml")


def _dry_run(capsys, *args: str) -> tuple[list[str], list[str], str]:
    """(#SBATCH options, body lines, suggested sbatch line) of `lorafit submit --dry_run ...`."""
    main(["submit", "--config", CONFIG, "--dry_run", *args])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    options = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    body = [line for line in lines if not line.startswith("#")]
    submit_line = next(line for line in lines if line.startswith("# submit with: "))
    return options, body, submit_line


def test_defaults_render_the_single_node_template(capsys):
    options, body, submit_line = _dry_run(capsys)
    assert options == [
        "--job-name=lorafit",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--signal=SIGUSR1@90",
        "--requeue",
        "--open-mode=append",
        "--output=runs/slurm-%x-%j.out",
    ]
    template = (REPO / "slurm" / "train_single_node.sbatch").read_text()
    template = template.replace("configs/trainer/slurm.yaml}", f"{REPO}/configs/trainer/slurm.yaml}}")
    assert body == [line for line in template.splitlines() if not line.startswith("#")]
    assert any(line.startswith("srun ") and "fit --config" in line for line in body)
    assert submit_line == f"# submit with: sbatch <this script> {CONFIG}"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--nodes", "3"], ["--nodes=3"]),
        (["--gpus_per_node", "4"], ["--ntasks-per-node=4", "--gpus-per-node=4"]),
        (["--gpus-per-node", "2"], ["--ntasks-per-node=2", "--gpus-per-node=2"]),  # old spelling
        (["--partition", "a100"], ["--partition=a100"]),
        (["--time", "1-12:00:00"], ["--time=1-12:00:00"]),
        (["--account", "proj42"], ["--account=proj42"]),
        (["--qos", "high"], ["--qos=high"]),
        (["--mem", "64G"], ["--mem=64G"]),
        (["--cpus_per_task", "16"], ["--cpus-per-task=16"]),
        (["--job_name", "dog-lora"], ["--job-name=dog-lora"]),
        (["--signal_seconds", "300"], ["--signal=SIGUSR1@300"]),
        (["--runs_dir", "/scratch/me/runs"], ["--output=/scratch/me/runs/slurm-%x-%j.out"]),  # and the run dir, below
        (
            ["--sbatch=--exclusive", "--sbatch=--constraint=h100", "--sbatch", "reservation=x"],
            ["--exclusive", "--constraint=h100", "--reservation=x"],
        ),
    ],
)
def test_each_option_lands_in_the_header(capsys, args, expected):
    options, _, _ = _dry_run(capsys, *args)
    for line in expected:
        assert line in options, (line, options)
    defaults, _, _ = _dry_run(capsys)
    changed = set(options) - set(defaults)
    assert changed == set(expected), changed  # nothing else moved


def test_runs_dir_is_also_where_the_run_directory_goes(capsys):
    _, body, _ = _dry_run(capsys, "--runs_dir", "/scratch/me/runs")
    assert "run_dir=${LORAFIT_RUNS:-/scratch/me/runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}" in body


def test_cpu_tasks_and_no_gpu_request(capsys):
    options, _, _ = _dry_run(capsys, "--cpu", "--ntasks_per_node", "2", "--cpus_per_task", "1")
    assert "--ntasks-per-node=2" in options and "--cpus-per-task=1" in options
    assert not any(o.startswith("--gpus") for o in options)


def test_more_nodes_selects_the_multi_node_template(capsys):
    _, body, _ = _dry_run(capsys, "--nodes", "2", "--gpus_per_node", "8")
    main(["submit", "--config", CONFIG, "--dry_run", "--nodes", "2"])
    assert "train_multi_node.sbatch" in capsys.readouterr().out
    assert any("--trainer.num_nodes" in line for line in body)


def test_more_configs_and_fit_arguments_go_to_lorafit_fit(capsys, tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("model:\n  rank: 8\n")
    _, _, submit_line = _dry_run(capsys, "--config", str(extra), "--", "--model.learning_rate", "2e-4")
    assert submit_line == f"# submit with: sbatch <this script> {CONFIG} --config {extra} --model.learning_rate 2e-4"


def test_own_template(capsys, tmp_path):
    template = tmp_path / "mine.sbatch"
    template.write_text('#!/usr/bin/env bash\n#SBATCH --foo=1\n#SBATCH --bar=2\necho mine "$@"\n')
    options, body, _ = _dry_run(capsys, "--template", str(template))
    assert "--foo=1" not in options and "--job-name=lorafit" in options
    assert body == ['echo mine "$@"']


def test_rendered_scripts_are_valid_bash(capsys, tmp_path):
    for args in ([], ["--nodes", "2", "--partition", "x", "--time", "30"]):
        main(["submit", "--config", CONFIG, "--dry_run", *args])
        script = tmp_path / "job.sbatch"
        script.write_text(capsys.readouterr().out)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "needs --config"),
        (["--config", "nope.yaml"], "--config nope.yaml does not exist"),
        (["--config", CONFIG, "--time", "soon"], "--time 'soon' is not a SLURM time"),
        (["--config", CONFIG, "--gpus_per_node", "4", "--ntasks_per_node", "2"], "one task per GPU"),
        (["--config", CONFIG, "--nodes", "0"], "--nodes is 0"),
        (["--config", CONFIG, "--job_name", "my lora"], "--job_name 'my lora'"),
        (["--config", CONFIG, "--nodes", "two"], "--nodes"),
        (["--config", CONFIG, "--model.rank", "8"], "put `lorafit fit` arguments after `--`"),
    ],
)
def test_bad_options_get_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "--dry_run", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafit: error: ") and message in err[0], err


def test_submit_saves_the_script_and_calls_sbatch(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "sbatch.args"}\necho 1234\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    runs = tmp_path / "runs"
    main(["submit", "--config", CONFIG, "--runs_dir", str(runs), "--job_name", "dog"])
    out = capsys.readouterr().out
    assert "submitted job 1234" in out and f"run dir {runs}/dog-1234" in out
    scripts = list((runs / "submit").glob("dog-*.sbatch"))
    assert len(scripts) == 1 and "#SBATCH --job-name=dog" in scripts[0].read_text()
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(scripts[0]), CONFIG]


def test_submit_without_sbatch_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["submit", "--config", CONFIG, "--runs_dir", str(tmp_path / "runs")])
    assert "`sbatch` not found" in capsys.readouterr().err


def test_old_dashed_spellings_work_with_a_one_line_notice(capsys):
    main(["submit", "--config", CONFIG, "--gpus-per-node", "2", "--job-name", "dog", "--dry-run"])
    captured = capsys.readouterr()
    assert "#SBATCH --gpus-per-node=2" in captured.out and "#SBATCH --job-name=dog" in captured.out
    renamed = (("--gpus-per-node", "--gpus_per_node"), ("--job-name", "--job_name"), ("--dry-run", "--dry_run"))
    assert captured.err.splitlines() == [
        f"WARNING lorafit.submit: {old} is now spelled {new} (the old spelling still works)" for old, new in renamed
    ]
    # A value that looks like a dashed option is the user's, not ours: passed to sbatch unchanged.
    options, _, _ = _dry_run(capsys, "--sbatch=--gres-flags=enforce-binding")
    assert "--gres-flags=enforce-binding" in options


# Values that would add a line to the script: shell code after a newline, and #SBATCH options
# (--requeue, --signal, --output) cut off by an early line end.
INJECTIONS = [
    ("--partition", "gpu\ntouch INJECTED"),
    ("--account", "proj\r\n#SBATCH --time=1"),
    ("--qos", "high\x00"),
    ("--mem", "64G\ntouch INJECTED"),
    ("--time", "4:00:00\ntouch INJECTED"),
    ("--runs_dir", "runs\ntouch INJECTED"),
    ("--sbatch", "--exclusive\ntouch INJECTED"),
    ("--config", CONFIG + "\ntouch INJECTED"),
]


@pytest.mark.parametrize("flag,value", INJECTIONS, ids=[flag for flag, _ in INJECTIONS])
def test_control_characters_in_any_value_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "--config", CONFIG, "--dry_run", f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorafit: error: {flag} ") and "control character" in err[0], err


@pytest.mark.parametrize("flag,value", [("--partition", "a b"), ("--account", "x'y"), ("--sbatch", "--comment=a#b")])
def test_values_sbatch_would_split_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["submit", "--config", CONFIG, "--dry_run", f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch would split" in err[0], err


def _stub(bin_dir: Path, name: str, log: Path) -> None:
    """A stand-in command that appends its arguments (NUL-separated, one call per line) to ``log``."""
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\0" {name} "$@" >> {log}\necho >> {log}\n')
    path.chmod(0o755)


def test_a_rendered_script_runs_nothing_but_the_training_command(tmp_path):
    """Shell syntax in every value that lands in the script stays text: the job runs srun, once."""
    # $IFS instead of blanks, which are refused in #SBATCH values anyway.
    payload = f"$(touch$IFS{tmp_path}/INJECTED)"
    options = SubmitOptions(
        configs=[CONFIG],
        runs_dir=f"runs{payload}`touch$IFS{tmp_path}/INJECTED2`;touch$IFS{tmp_path}/INJECTED3",
        partition=f"gpu;{payload}",
        account=payload,
        qos="a|touch",
        mem="64G&&touch",
        sbatch_options=[f"--comment={payload}"],
        job_name="dog",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render(options))
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", log)
    _stub(bin_dir, "lorafit", log)  # would only run if srun were bypassed
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_NAME": "dog",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
    }
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(["bash", str(script), CONFIG, "--model.rank", "8"], cwd=work, env=env, capture_output=True)
    assert result.returncode == 0, result.stderr
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines() if line]
    run_dir = f"{options.runs_dir}/dog-77"
    assert calls == [
        [
            "srun",
            "--kill-on-bad-exit=1",
            "lorafit",
            "fit",
            "--config",
            CONFIG,
            "--config",
            str(REPO / "configs" / "trainer" / "slurm.yaml"),
            "--trainer.default_root_dir",
            run_dir,
            "--trainer.num_nodes",
            "1",
            "--trainer.devices",
            "1",
            "--model.rank",
            "8",
        ]
    ]
    assert not [p.name for p in tmp_path.rglob("INJECTED*")], "a value was run as a command"
    assert os.listdir(work) == [], "the script wrote files of its own"


def test_allow_pipe_is_exported_into_the_job(capsys):
    _, body, _ = _dry_run(capsys, "--allow_pipe")
    assert "export LORAFIT_ALLOW_PIPE=1" in " ".join(body)
    _, body, _ = _dry_run(capsys)
    assert "LORAFIT_ALLOW_PIPE" not in " ".join(body)


def test_an_unwritable_runs_dir_is_one_line(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    (tmp_path / "runs").write_text("a file, not a folder")
    with pytest.raises(SystemExit):
        main(["submit", "--config", CONFIG, "--runs_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the job script" in err[0] and "--runs_dir" in err[0], err
