"""The opening and running shared by the sharded jobs `csd sample | score | translate`.

    job = open_stage(PROG, "sample", "samples", v, argv, settings, fingerprint, len(prompts))
    if isinstance(job, int):
        return job                  # data-parallel children did the work, or none was left
    engine = ...                    # built only now: a finished folder never starts vLLM
    try:
        job.run(work, unit="sample", rows_per_unit=K)
    finally:
        engine.close()
    return job.finish()

`open_stage` resolves the hardware profile, opens the output's shard store (which checks a
resumed run's settings and fingerprint against its manifest), prints and saves the resolved
settings, and either launches one child per device (`--data-parallel`) or picks this worker's
shards. Test: `python -m pytest tests/sampling -q`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csd_fast.sampling import profiles, runner, store
from csd_fast.sampling.options import show_settings


@dataclass
class StageJob:
    """One worker's share of a sharded job whose output store is open."""

    prog: str
    v: dict
    profile: Any  # csd_fast.sampling.profiles.Profile
    out: store.ShardStore
    mine: list[int]  # this worker's shards, done or not
    todo: list[int]  # those still to write

    @property
    def child(self) -> bool:
        return self.v["dp_rank"] is not None

    def run(self, work: Callable[[int], Any], *, unit: str, rows_per_unit: int = 1) -> int:
        """Write every unfinished shard of this worker with `work(j)`; -> rows written."""
        total = sum(self.out.units(j)[1] - self.out.units(j)[0] for j in self.todo)
        rank = self.v["dp_rank"]
        return runner.run_shards(
            self.out,
            self.mine,
            work,
            total=total * rows_per_unit,
            unit=unit,
            label=self.prog if rank is None else f"{self.prog} [rank {rank}]",
            rows_per_unit=rows_per_unit,
            position=rank or 0,
        )

    def finish(self) -> int:
        """Finalize the manifest (the parent only) and end the process as the backend needs."""
        code = report(self.out, 0) if not self.child else 0
        return runner.exit_cleanly(code, self.v["backend"] == "vllm")


def open_stage(
    prog: str,
    stage: str,
    kind: str,
    v: dict,
    argv: list[str],
    settings: dict,
    fingerprint: dict,
    num_units: int,
    *,
    describe_profile: bool = False,
) -> StageJob | int:
    """The job of this process, or its exit code when there is nothing left for it to do."""
    from csd_fast.sampling.sample import (
        data_parallel_size,
        resolved_settings,
        settings_path,
        strip_dp_flags,
    )

    profile = profiles.resolve_profile(v["profile"], v["engine_arg"], v["env"])
    shard = store.parse_shard_spec(v["shard"])
    child = v["dp_rank"] is not None
    out = store.ShardStore(
        v["output"],
        kind,
        settings,
        fingerprint,
        num_units=num_units,
        shard_size=v["shard_size"],
        overwrite=v["overwrite"] and not child,
    )
    if not child:
        show_settings(
            prog, resolved_settings(v, profile, fingerprint), settings_path(v["output"], shard)
        )
        if describe_profile:
            print(profile.describe(), flush=True)
    dp = 1 if child else data_parallel_size(v["data_parallel"], v["backend"], profile)
    if dp > 1:
        return report(out, runner.launch_data_parallel(stage, strip_dp_flags(argv), profile, dp))
    worker, workers = runner.worker_index(shard, v["dp_rank"] or 0, v["dp_size"] or 1)
    mine = store.worker_shards(out.num_shards, worker, workers)
    todo = out.todo(worker, workers)
    if not todo:
        print(f"[{prog}] nothing to do: all {len(mine)} shard(s) of this worker are written")
        return report(out, 0)
    profiles.apply_env(profile.env)
    return StageJob(prog, v, profile, out, mine, todo)


def report(out: store.ShardStore, code: int) -> int:
    """Finalize the manifest and print the output's state; -> `code`."""
    manifest = out.finalize()
    written = len(manifest["shards"])
    rows = sum(r["rows"] for r in manifest["shards"])
    state = "complete" if manifest["complete"] else f"{written}/{manifest['num_shards']} shards"
    print(f"[{out.kind}] {out.dir}: {state}, {rows} rows", flush=True)
    return code
