"""The console scripts (`fraqat-train`, `fraqat-eval`, `fraqat-export`, `fraqat-plan`): `--help` and the
errors the config alone can tell, answered before torch, Lightning or diffusers are imported.

`--help` is read from the command's own config (`hydra.help.header`/`footer` in `conf/<command>.yaml`) and
lists only the config groups that config's defaults name; everything else is Hydra's, then the command's
`main` (its module's Hydra task, called as a task) once the config has been composed and checked.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib import resources

EXIT_BAD_INPUT = 2
HELP_FLAGS = ("--help", "-h")


@dataclass(frozen=True)
class Command:
    program: str
    config: str  # conf/<config>.yaml
    module: str  # the module whose `main` (a Hydra task) does the work


COMMANDS = {c.program: c for c in (
    Command("fraqat-train", "train", "fraqat_cli.train.command"),
    Command("fraqat-eval", "eval", "fraqat_cli.evaluate.command"),
    Command("fraqat-export", "export", "fraqat_cli.export.command"),
    Command("fraqat-plan", "plan", "fraqat_cli.plan.command"),
)}


def train():
    run(COMMANDS["fraqat-train"])


def evaluate():
    run(COMMANDS["fraqat-eval"])


def export():
    run(COMMANDS["fraqat-export"])


def plan():
    run(COMMANDS["fraqat-plan"])


def run(command: Command, argv: list[str] | None = None):
    """Answer `--help` from the config files; otherwise let Hydra compose the config and run the command."""
    argv = sys.argv[1:] if argv is None else argv
    if any(flag in argv for flag in HELP_FLAGS) and "--hydra-help" not in argv:
        print(help_text(command))
        return None
    import hydra  # past the help path: --help never waits for Hydra

    main = hydra.main(config_path="pkg://fraqat_cli.conf", config_name=command.config, version_base="1.3")
    return main(_task(command))()


def _task(command: Command):
    def task(cfg):
        work = importlib.import_module(command.module).main  # the heavy imports start here
        return work.__wrapped__(cfg)  # the Hydra task under its module's @hydra.main

    task.__module__ = command.module  # Hydra names the job (and its log, <job>.log) after the task's module
    return task


def refuse_missing(program: str, cfg) -> None:
    """A required key left at `???` (e.g. fraqat-eval's `ckpt`): one line naming it, exit 2. Called by the
    `fraqat_cli.cli.RequiredKeys` Hydra callback, before the run folder is made."""
    missing = list(_missing_keys(cfg))
    if missing:
        keys = ", ".join(missing)
        print(f"{program}: error: {keys} is required and has no default; give it on the command line, e.g. "
              f"{missing[0]}=... ({program} --help shows examples)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _missing_keys(node, prefix: str = ""):
    """Keys left at `???`, found without resolving any interpolation (`${hydra:...}` cannot resolve yet)."""
    from omegaconf import DictConfig, OmegaConf  # only once Hydra runs (the help path never needs it)

    for key, value in node.items_ex(resolve=False):
        if key == "hydra" and not prefix:  # Hydra's own settings: not the command's keys
            continue
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif isinstance(value, DictConfig):
            yield from _missing_keys(value, f"{prefix}{key}.")


def help_text(command: Command) -> str:
    """What the command does, its common invocations and required keys (the config's `hydra.help.header`),
    the config groups it reads with their options, and the footer."""
    config = _read_config(command.config)
    help_cfg = config.get("hydra", {}).get("help", {})
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in config_groups(command.config))
    return "\n".join([
        help_cfg.get("header", command.program).rstrip(), "",
        "Config groups it reads (GROUP=OPTION; * marks the default):", groups, "",
        f"Any key of the config can be set as KEY=VALUE; `{command.program} --cfg job` prints the whole config,",
        "and --multirun sweeps comma-separated values (Hydra: --hydra-help).",
        help_cfg.get("footer", "").rstrip(),
    ]).rstrip() + "\n"


def config_groups(name: str) -> list[tuple[str, list[str]]]:
    """(group, options) for every group in `conf/<name>.yaml`'s defaults (and the configs it extends): its
    options are the group folder's files, less the `_`-prefixed ones the options share (`quantizer/_base`);
    the default is starred. Hydra's own groups (`hydra/...`, `override ...`) are not the command's."""
    root = resources.files("fraqat_cli.conf")
    groups = []
    for entry in _defaults(name):
        if not isinstance(entry, dict):
            continue
        (key, default), = entry.items()
        words = key.split()
        if words[0] == "override" or words[-1].startswith("hydra"):
            continue
        group = words[-1]
        options = sorted(f.name[:-5] for f in root.joinpath(group).iterdir()
                         if f.name.endswith(".yaml") and not f.name.startswith("_"))
        groups.append((group, [f"{o}*" if o == default else o for o in options]))
    return groups


def _defaults(name: str) -> list:
    """The defaults list of `conf/<name>.yaml`, with a config it extends (`- train` in plan.yaml) expanded."""
    expanded = []
    for entry in _read_config(name).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            expanded.extend(_defaults(entry))
        else:
            expanded.append(entry)
    return expanded


def _read_config(name: str) -> dict:
    import yaml  # only --help reads the config files this way

    return yaml.safe_load(resources.files("fraqat_cli.conf").joinpath(f"{name}.yaml").read_text()) or {}
