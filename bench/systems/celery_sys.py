from __future__ import annotations

from bench.brokers import RedisServer
from bench.systems.base import Profile, System


class Celery(System):
    name = "celery"
    client_module = "celery_client"

    def start_infra(self) -> None:
        self.redis = RedisServer(self.name, self.ctx.workdir).start()

    def stop_infra(self) -> None:
        self.redis.stop()

    def broker_env(self) -> dict[str, str]:
        return {"BENCH_BROKER_URL": self.redis.url}

    def _argv(self, pool: str, c: int, node: str) -> list[str]:
        return [
            self.python,
            "-m",
            "celery",
            "-A",
            "bench.peer_tasks.celery_app",
            "worker",
            "-P",
            pool,
            "-c",
            str(c),
            "-Q",
            "bench",
            "-n",
            f"{node}@bench",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]

    @property
    def std_pool(self) -> str:
        return self.ctx.extra.get("celery_pool", "prefork")

    def spawn_workers(self, profile: Profile) -> None:
        if profile.name == "std" and self.std_pool != "prefork":
            for i in range(profile.procs):
                c = 1 if self.std_pool == "solo" else profile.slots
                self.spawn_worker(f"{profile.name}-w{i}", self._argv(self.std_pool, c, f"w{i}"))
        elif profile.name == "std":
            # Celery's natural model: one prefork worker with N child processes (1 slot each).
            self.spawn_worker(f"{profile.name}-w0", self._argv("prefork", profile.procs, "w0"))
        else:
            for i in range(profile.procs):
                self.spawn_worker(
                    f"{profile.name}-w{i}", self._argv("threads", profile.slots, f"w{i}")
                )

    def describe(self, profile: Profile) -> str:
        if profile.name == "std" and self.std_pool == "solo":
            return f"{profile.procs} workers x solo pool"
        if profile.name == "std" and self.std_pool == "threads":
            return f"{profile.procs} workers x threads pool -c {profile.slots}"
        if profile.name == "std":
            return (
                f"1 worker, prefork pool -c {profile.procs} (celery's natural model; "
                "1 slot per child)"
            )
        return f"{profile.procs} workers x threads pool -c {profile.slots}"

    def versions(self) -> dict[str, str]:
        return self.pip_versions("celery", "kombu", "redis")
