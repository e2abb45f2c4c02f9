"""`make chaos`: run seeded scenarios, check each, report; replay one with its seed.

    python -m chaos --seed 7                # replay scenario 7 (prints its timeline)
    python -m chaos --runs 300 --minutes 600 --first-seed 1000
    python -m chaos --seeds 3,17,42 --fresh  # CI: a fixed list plus one fresh seed
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from chaos.oracle import Verdict, check
from chaos.runner import play
from chaos.scenario import FAULTS, Scenario, generate


def run_one(scenario: Scenario, workdir: Path, keep: bool) -> tuple[Verdict, dict[str, int]]:
    root = Path(tempfile.mkdtemp(prefix=f"chaos-{scenario.seed}-", dir=workdir))
    shutil.rmtree(root)
    run = play(scenario, root)
    try:
        verdict = check(run)
    except Exception:  # the campaign's own failure is reported, never taken for a pass
        verdict = Verdict(violations=["campaign: the oracle failed:\n" + traceback.format_exc()])
    finally:
        run.close()
    injected = {k: n for k, n in scenario.faults().items()
                if k not in _EVENT_KINDS} | run.injected
    if not verdict.violations and not keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        (root / "share.log").write_text("\n".join(run.truth.done) + "\n", encoding="utf-8")
        click.echo(f"  kept in {root}")
    return verdict, injected


_EVENT_KINDS = {"slow-writer"} - {"slow-writer"} | set(FAULTS["share"]) - {"slow-writer"} | set(
    FAULTS["importer"]) | {"down", "refuse-association", "abort", "stall-dimse"}


def shrink(scenario: Scenario, workdir: Path) -> Scenario:
    """Drop events one at a time while the scenario still fails (a greedy one-pass shrink)."""
    i = 0
    while i < len(scenario.events):
        smaller = scenario.without(i)
        verdict, _ = run_one(smaller, workdir, keep=False)
        if verdict.violations:
            scenario = smaller
            click.echo(f"  still fails without event {i}: {len(scenario.events)} events left")
        else:
            i += 1
    return scenario


@click.command()
@click.option("--seed", type=int, help="Replay this one scenario.")
@click.option("--seeds", default="", help="Comma-separated seeds to run.")
@click.option("--fresh", is_flag=True, help="Add one fresh random seed (printed).")
@click.option("--runs", type=int, default=0, help="Scenarios to run from --first-seed on.")
@click.option("--first-seed", type=int, default=1)
@click.option("--minutes", type=float, default=0, help="Stop starting scenarios after this.")
@click.option("--shrink", "do_shrink", is_flag=True, help="Shrink each failing scenario.")
@click.option("--keep", is_flag=True, help="Keep every scenario's directory.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp"))
def main(seed: int | None, seeds: str, fresh: bool, runs: int, first_seed: int,
         minutes: float, do_shrink: bool, keep: bool, workdir: Path) -> None:
    """Seeded random fault scenarios against the real importer, checked by the oracle."""
    chosen = [seed] if seed is not None else [int(s) for s in seeds.split(",") if s.strip()]
    if fresh:
        chosen.append(random.SystemRandom().randrange(1, 10**9))
        click.echo(f"fresh seed: {chosen[-1]}")
    chosen += range(first_seed, first_seed + runs)
    if not chosen:
        raise click.UsageError("nothing to run: give --seed, --seeds, --fresh or --runs")
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    faults: dict[str, int] = {}
    checks, failed, done = 0, [], 0
    began = time.monotonic()
    for s in chosen:
        if deadline is not None and time.monotonic() > deadline:
            break
        scenario = generate(s)
        if seed is not None:
            click.echo(scenario.timeline())
        started = time.monotonic()
        verdict, injected = run_one(scenario, workdir, keep)
        done += 1
        checks += verdict.checks
        for k, n in injected.items():
            faults[k] = faults.get(k, 0) + n
        status = "ok" if not verdict.violations else f"{len(verdict.violations)} VIOLATIONS"
        click.echo(f"seed {s}: {scenario.mode}, {len(scenario.folders)} folders, "
                   f"{sum(injected.values())} faults, {verdict.checks} checks, "
                   f"{time.monotonic() - started:.0f} s: {status}", err=False)
        if verdict.violations:
            failed.append(s)
            click.echo(scenario.timeline())
            for line in verdict.violations[:20]:
                click.echo(f"  VIOLATION {line}")
            if do_shrink:
                click.echo("shrunk:\n" + shrink(scenario, workdir).timeline())
        sys.stdout.flush()
    click.echo(f"\n{done} scenarios in {(time.monotonic() - began) / 60:.1f} min, "
               f"{checks} checks, {len(failed)} with violations"
               + (f" (seeds {', '.join(map(str, failed))}; replay: make chaos SEED=<seed>)"
                  if failed else ""))
    for side, kinds in FAULTS.items():
        click.echo(f"  {side:9} " + ", ".join(f"{k} {faults.get(k, 0)}" for k in kinds))
    sys.exit(1 if failed or not done else 0)


if __name__ == "__main__":
    main()
