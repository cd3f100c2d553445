from __future__ import annotations

from bench.brokers import RedisServer
from bench.systems.base import Profile, System


class Dramatiq(System):
    name = "dramatiq"
    client_module = "dramatiq_client"

    def start_infra(self) -> None:
        self.redis = RedisServer(self.name, self.ctx.workdir).start()

    def stop_infra(self) -> None:
        self.redis.stop()

    def broker_env(self) -> dict[str, str]:
        return {"BENCH_BROKER_URL": self.redis.url}

    def spawn_workers(self, profile: Profile) -> None:
        self.spawn_worker(
            f"{profile.name}",
            [
                self.python,
                "-m",
                "dramatiq",
                "bench.peer_tasks.dramatiq_app",
                "--processes",
                str(profile.procs),
                "--threads",
                str(profile.slots),
                "-Q",
                "bench",
            ],
        )

    def describe(self, profile: Profile) -> str:
        return f"--processes {profile.procs} --threads {profile.slots}"

    def versions(self) -> dict[str, str]:
        return self.pip_versions("dramatiq", "redis")
