from __future__ import annotations

from bench import procs
from bench.systems.base import Profile, System, SystemError_

APP = "bench.peer_tasks.procrastinate_app.app"


class Procrastinate(System):
    name = "procrastinate"
    client_module = "procrastinate_client"

    def start_infra(self) -> None:
        if self.ctx.pg is None:
            raise SystemError_("PostgreSQL not available")
        self.db = self.ctx.pg.create_db(f"bench_procrastinate_{self.ctx.run_id}")
        self.url = self.ctx.pg.conninfo(self.db)
        r = procs.run(
            [self.python, "-m", "procrastinate", "--app", APP, "schema", "--apply"],
            env=self.env(),
            timeout=120,
        )
        if r.returncode != 0:
            raise SystemError_(f"procrastinate schema --apply failed: {r.stderr[-800:]}")

    def stop_infra(self) -> None:
        if getattr(self, "db", None):
            self.ctx.pg.drop_db(self.db)  # type: ignore[union-attr]

    def broker_env(self) -> dict[str, str]:
        return {"BENCH_BROKER_URL": self.url}

    def spawn_workers(self, profile: Profile) -> None:
        for i in range(profile.procs):
            self.spawn_worker(
                f"{profile.name}-w{i}",
                [
                    self.python,
                    "-m",
                    "procrastinate",
                    "--app",
                    APP,
                    "--log-level",
                    "warning",
                    "worker",
                    "--queues",
                    "bench",
                    "--concurrency",
                    str(profile.slots),
                    "--name",
                    f"w{i}",
                ],
            )

    def describe(self, profile: Profile) -> str:
        return (
            f"{profile.procs} worker processes x --concurrency {profile.slots} "
            "(LISTEN/NOTIFY), async tasks"
        )

    def versions(self) -> dict[str, str]:
        return self.pip_versions("procrastinate", "psycopg")
