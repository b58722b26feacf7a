"""README.md's commands run as written, in the order written, in a folder laid out like a clone.

Every command of every ``bash`` block is walked (on tiny settings where it trains) or skipped for a stated reason;
a command that is neither fails the test, as does a skip that no command needs any more, so the README and the
code cannot drift apart. ``python`` blocks run after the commands (they use what the commands trained); ``yaml``
blocks are experiment-config fragments, composed onto the main job's config and checked by a dry run.
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest
import uvicorn
import yaml

import edm_lightning
from edm_lightning import cli
from edm_lightning.attacks import run_knockoff
from edm_lightning.data import __main__ as data_command
from edm_lightning.data.datasets import DATASETS
from edm_lightning.experiment import __main__ as experiment_command
from edm_lightning.export import __main__ as export_command
from edm_lightning.serve import __main__ as serve_command
from tests.helpers.files import REPO_ROOT

README = REPO_ROOT / "README.md"

#: Commands the walk does not run (a regular expression matched at the start of the command), and why.
SKIPPED = {
    r"pip install ": "the test environment is that install",
    r"python -m pytest": "this test suite",
    r"ruff ": "the linter, which CI runs beside the suite",
    r"wandb (sweep|agent) ": "needs a W&B account (tests/test_sweeps.py checks the sweep files offline)",
    r"python main\.py fit .*--config configs/trainer/gpu_": "needs GPUs (8, or 2 nodes of 8)",
    r"python main\.py fit .*--config configs/trainer/cpu_ddp2\.yaml": "DDP relaunches the command line as 2 processes, "
        "which cannot happen inside this one; tests/test_distributed.py runs this composition in subprocesses",
    r"(\w+=\S+ )*sbatch ": "needs a SLURM cluster",
    r"(\w+=\S+ )*bash scripts/torchrun\.sh ": "torchrun over 8 GPUs",
    r"bash scripts/gpu_check\.sh": "needs a GPU",
    r"python -m edm_lightning\.experiment .*--config configs/experiment/devices/gpu_node\.yaml": "needs a node of 8 GPUs",
    r"python -m edm_lightning\.experiment .*--executor slurm": "needs a SLURM cluster",
    r"curl ": "the API is tested against a live server in tests/test_serve.py",
    r"export PGPASSWORD=": "the database password of the replicas' PostgreSQL, for the commands after it",
    r"python -m edm_lightning\.serve .*--ledger postgresql://": "needs that PostgreSQL server; tests/test_replicas.py and "
        "tests/test_ledger.py run init-ledger and replicas on a throw-away one",
}

#: Trainer options appended to every ``main.py`` job of a committed config: each takes seconds.
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
# the configs hold out 5,000 (hashnet: 1,000) training images for validation, more than the synthetic splits hold
_HELD_OUT = ["--data.init_args.val_size", "40"]
# KnockoffNets buys 50,000 answers and labels the victim's whole test split
_KNOCKOFF = ["--data.init_args.budget", "160", "--data.init_args.batch_size", "32", "--data.init_args.test_size", "40"]
# JBDA-TR augments 150 seed images over 6 rounds of 10 epochs; max_epochs must be (rounds + 1) x epochs_per_round
_JBDA = ["--data.init_args.seed_size", "20", "--data.init_args.budget", "40", "--data.init_args.batch_size", "16",
         "--data.init_args.test_size", "40", "--model.init_args.rounds", "1", "--model.init_args.epochs_per_round", "1",
         "--trainer.max_epochs", "2"]
#: What else each committed config needs to take seconds on the synthetic data root (after TINY, so these win).
#: An experiment config listed here runs for real with these overrides; any other experiment command runs as a dry run.
TINY_BY_CONFIG = {
    "configs/baseline.yaml": _HELD_OUT,
    "configs/hashnet.yaml": _HELD_OUT,
    "configs/edm.yaml": _HELD_OUT,
    "configs/misinformation.yaml": _HELD_OUT,
    "configs/attack/knockoff.yaml": _KNOCKOFF,
    "configs/attack/knockoff_vs_edm.yaml": _KNOCKOFF,
    "configs/attack/knockoff_vs_edm_am.yaml": _KNOCKOFF,
    "configs/attack/jbda_tr.yaml": _JBDA,
    "configs/attack/knockoff_fixmatch.yaml": [*_KNOCKOFF, "--data.init_args.mu", "2"],
    # D-DAE's shadow kit: 3 shadows per defense, 1 epoch each, on a fifth of the synthetic training split
    "configs/attack/ddae.yaml": [*_KNOCKOFF, "--data.init_args.budget", "320", "--data.init_args.share", "0.2",
                                 "--data.init_args.probes", "48", "--data.init_args.shadows", "3",
                                 "--data.init_args.held_out", "1", "--data.init_args.shadow_epochs", "1",
                                 "--data.init_args.edm_members", "2", "--data.init_args.pool_images", "60",
                                 "--data.init_args.kit_steps", "20"],
    # the quick start: one epoch of each part, 2 members, one small budget, 40 test images (10 stages, seconds each)
    "configs/experiment/fashionmnist.yaml": [
        "--test_size", "40", "--target.epochs", "1", "--target.batch_size", "32", "--target.val_size", "40",
        "--hashnet.epochs", "1", "--hashnet.batch_size", "32", "--hashnet.val_size", "40", "--edm.epochs", "1",
        "--edm.batch_size", "32", "--edm.val_size", "40", "--edm.num_members", "2",
        "--attacks", "[{name: knockoff, surrogate: mnist, budgets: [128], epochs: 1, options: {batch_size: 32}}]"],
}
#: The Python blocks' KnockoffNets, on tiny settings (its README call buys 20,000 answers and trains 5 epochs).
TINY_KNOCKOFF = dict(budget=160, max_epochs=1, batch_size=32, test_size=40)


@dataclass
class Command:
    """One command of a README block: its words as the shell splits them, and where it is written."""

    line: int
    words: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def __str__(self) -> str:
        return f"README.md line {self.line}: {self.text}"


def blocks(text: str) -> list[tuple[str, int, str]]:
    """Every fenced block of ``text``: its language, the line its body starts on, its body."""
    return [(match.group(1), text[:match.start()].count("\n") + 2, match.group(2))
            for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(body: str, first_line: int) -> list[Command]:
    """The commands of a bash block: continued lines joined, comments dropped, ``&&`` chains split."""
    found, pending, start = [], "", first_line
    for number, line in enumerate(body.splitlines(), first_line):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words, pending = shlex.split(pending + line, comments=True), ""
        while words:
            head, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) if "&&" in words else (words, [])
            found.append(Command(start, head))
    return found


README_BLOCKS = blocks(README.read_text())
COMMANDS = [command for language, line, body in README_BLOCKS if language == "bash" for command in commands(body, line)]


def skip_reason(command: Command) -> str | None:
    return next((reason for pattern, reason in SKIPPED.items() if re.match(pattern, command.text)), None)


class Walk:
    """The walk's state: its folder (a clone's layout) and the shell variables the README sets."""

    def __init__(self, folder: Path, capsys, monkeypatch, real_root: Path):
        self.folder, self.capsys, self.monkeypatch, self.real_root = folder, capsys, monkeypatch, real_root
        self.variables: dict[str, str] = {}

    def resolve(self, words: list[str]) -> list[str]:
        """``$name`` replaced by the README's own variables; a ``<placeholder>`` (``edm-<hash>``) by the walk's file."""
        resolved = []
        for word in words:
            word = Template(word).substitute(self.variables)
            if re.search(r"<\w+>", word):
                matches = sorted(self.folder.glob(re.sub(r"<\w+>", "*", word)))
                assert matches, f"nothing in the walk's folder matches {word}"
                word = str(matches[0].relative_to(self.folder))
            resolved.append(word)
        return resolved

    def output(self) -> tuple[str, str]:
        captured = self.capsys.readouterr()
        return captured.out, captured.err

    def files(self) -> dict[Path, int]:
        """Every file the walk wrote (data and configs are links out of it), with its modification time."""
        return {path: path.stat().st_mtime_ns for path in self.folder.rglob("*")
                if path.is_file() and path.parts[len(self.folder.parts)] not in ("data", "configs")}


def configs(words: list[str]) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]


def tiny_overrides(words: list[str]) -> list[str]:
    return [override for config in configs(words) for override in TINY_BY_CONFIG.get(config, [])]


def summary_checkpoint(out: str, subcommand: str) -> Path | None:
    """The checkpoint named by the job's closing line (``fit: ...; checkpoint runs/.../best.ckpt``)."""
    lines = [line for line in out.splitlines() if line.startswith(f"{subcommand}: ")]
    assert lines, f"no closing `{subcommand}: ...` line"
    found = re.search(r"; (?:clone )?checkpoint (\S+)", lines[-1])
    assert found, lines[-1]
    return None if found.group(1) == "none" else Path(found.group(1))


def run_main_py(walk: Walk, words: list[str]) -> None:
    assert (REPO_ROOT / "main.py").is_file()
    args = walk.resolve(words[2:])
    # a committed config is made tiny; a stage's own config.yaml was written by the (tiny) quick start
    committed = any(config.startswith("configs/") for config in configs(args))
    cli.main([*args, *(TINY + tiny_overrides(args) if committed else [])])
    out, _ = walk.output()
    checkpoint = summary_checkpoint(out, args[0])
    assert checkpoint is not None or args[0] == "test", "a fit names the checkpoint it wrote"
    assert checkpoint is None or (walk.folder / checkpoint).is_file(), f"{checkpoint} does not exist"


def run_experiment(walk: Walk, words: list[str], tiny: bool = True) -> None:
    args = walk.resolve(words[3:])
    overrides = tiny_overrides(args) if tiny else []
    dry = "--dry_run" in args or not overrides  # an experiment without tiny settings is only planned
    before = walk.files()
    # a plan of a committed config's full sizes is checked against the real datasets (the synthetic ones are too small)
    real = ["--root", str(walk.real_root)] if dry and not overrides else []
    experiment_command.main([*args, *overrides, *real, *(["--dry_run", "true"] if dry and "--dry_run" not in args else [])])
    out, err = walk.output()
    if dry:
        plan = re.search(r"(\d+) stages, (\d+) already done", out)
        assert plan, out[-2000:]
        assert walk.files() == before, "a dry run wrote files"
        assert not overrides or plan[1] == plan[2], "the quick start's own plan is done: a re-run reuses every stage"
        return
    results = re.search(r"^results: (\S+)$", err, re.M)  # the runner's log
    assert results and (walk.folder / results.group(1)).is_file(), err[-2000:]
    assert Path(results.group(1)).parts[0] == "runs" and not (walk.folder / "results").exists(), \
        "the quick start writes next to the committed reference results, never over them"


def run_data(walk: Walk, words: list[str]) -> None:
    args = walk.resolve(words[3:])
    assert data_command.main(args) == 0
    out, _ = walk.output()
    if args[0] == "list":
        assert all(spec.name in out for _, spec in DATASETS.items()), out
    else:
        assert all(f"{name}: already present" in out for name in args[1:] if name in DATASETS), out


def run_export(walk: Walk, words: list[str]) -> None:
    args = walk.resolve(words[3:])
    manifest = export_command.main(args)
    out_file = walk.folder / args[args.index("--out") + 1]
    assert out_file.is_file() and Path(f"{out_file}.json").is_file() and manifest["equivalence"]["inputs"] > 0


def run_serve(walk: Walk, words: list[str]) -> None:
    """``add-client`` as written; the server up to the point where it would serve (``tests/test_serve*.py`` serve)."""
    args = walk.resolve(words[3:])
    if args[0] == "add-client":
        serve_command.main(args)
        out, _ = walk.output()
        clients = yaml.safe_load((walk.folder / args[args.index("--file") + 1]).read_text())["clients"]
        assert out.strip() and args[args.index("--name") + 1] in [client["name"] for client in clients]
        return
    served = []
    walk.monkeypatch.setattr(serve_command, "listen", lambda host, port: socket.create_server(("127.0.0.1", 0)))
    walk.monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.extend(sockets))
    serve_command.main(args)
    _, err = walk.output()
    assert served and "serving " in err, err[-2000:]
    for listening in served:
        listening.close()


def set_variable(walk: Walk, words: list[str]) -> None:
    name, _, value = words[0].partition("=")
    walk.variables[name] = value


#: How each kind of command is walked (a regular expression matched at the start of the command).
WALKED = {
    r"\w+=\S+$": set_variable,  # a shell variable alone, used by the commands after it
    r"python main\.py ": run_main_py,
    r"python -m edm_lightning\.experiment ": run_experiment,
    r"python -m edm_lightning\.data ": run_data,
    r"python -m edm_lightning\.export ": run_export,
    r"python -m edm_lightning\.serve ": run_serve,
}


def walker(command: Command):
    return next((walk for pattern, walk in WALKED.items() if re.match(pattern, command.text)), None)


def run(walk: Walk, what: str, action, *args) -> None:
    """``action(*args)``, any failure or non-zero exit reported with the README command it ran."""
    try:
        action(*args)
    except SystemExit as exited:
        if exited.code not in (0, None):
            pytest.fail(f"{what} exited {exited.code}:\n{walk.output()[1][-3000:]}", pytrace=False)
    except Exception as err:
        raise AssertionError(f"{what} failed: {err}\n{walk.output()[1][-3000:]}") from err


def test_every_readme_command_is_walked_or_skipped_for_a_stated_reason():
    unknown = [str(command) for command in COMMANDS if not skip_reason(command) and not walker(command)]
    assert not unknown, "README commands the walk neither runs nor skips (add a runner or a reason to SKIPPED):\n" + \
        "\n".join(unknown)
    stale = [pattern for pattern in SKIPPED if not any(re.match(pattern, command.text) for command in COMMANDS)]
    assert not stale, f"SKIPPED entries no README command needs any more: {stale}"
    files = {word for command in COMMANDS if skip_reason(command) for word in command.words
             if re.match(r"(configs|scripts)/\S+\.\w+$", word.partition("=")[2] or word)}
    assert all((REPO_ROOT / (word.partition("=")[2] or word)).is_file() for word in files), files  # skipped, not stale
    assert {language for language, _, _ in README_BLOCKS} <= {"bash", "python", "yaml", ""}


@pytest.mark.integration
def test_the_readme_walks_from_top_to_bottom(fake_root: Path, real_data_root: Path, tmp_path_factory, monkeypatch, capsys,
                                             fresh_wandb_session):
    folder = tmp_path_factory.mktemp("clone")
    for name in ("configs", "main.py"):
        (folder / name).symlink_to(REPO_ROOT / name)
    (folder / "data").symlink_to(fake_root, target_is_directory=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the W&B commands log nowhere
    monkeypatch.setattr(edm_lightning, "run_knockoff",
                        lambda victim, **settings: run_knockoff(victim, **{**settings, **TINY_KNOCKOFF}))
    walk = Walk(folder, capsys, monkeypatch, real_data_root)
    for command in COMMANDS:
        if not skip_reason(command):
            run(walk, str(command), walker(command), walk, command.words)
            walk.output()
    for language, line, body in README_BLOCKS:
        if language == "python":  # after the commands, which train the models it loads
            run(walk, f"README.md's Python block at line {line}", exec, compile(body, f"README.md line {line}", "exec"), {})
        elif language == "yaml":  # composed onto the main job's config and checked, stage sections included
            fragment = folder / f"readme-{line}.yaml"
            fragment.write_text(body)
            run(walk, f"README.md's YAML block at line {line}", run_experiment, walk,
                ["python", "-m", "edm_lightning.experiment", "--config", "configs/experiment/fashionmnist.yaml",
                 "--config", fragment.name, "--dry_run", "true"], False)
