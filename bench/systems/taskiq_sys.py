from __future__ import annotations

from bench.brokers import NatsServer
from bench.systems.base import Profile, System


class Taskiq(System):
    name = "taskiq"
    client_module = "taskiq_client"

    def start_infra(self) -> None:
        self.nats = NatsServer(self.name, self.ctx.workdir).start()

    def stop_infra(self) -> None:
        self.nats.stop()

    def broker_env(self) -> dict[str, str]:
        return {"BENCH_BROKER_URL": self.nats.url}

    def spawn_workers(self, profile: Profile) -> None:
        self.spawn_worker(
            f"{profile.name}",
            [
                self.python,
                "-m",
                "taskiq",
                "worker",
                "bench.peer_tasks.taskiq_app:broker",
                "--workers",
                str(profile.procs),
                "--max-async-tasks",
                str(profile.slots),
                "--log-level",
                "WARNING",
            ],
        )

    def describe(self, profile: Profile) -> str:
        return (
            f"--workers {profile.procs} --max-async-tasks {profile.slots}; "
            "PullBasedJetStreamBroker (fetch batch 1), async tasks"
        )

    def versions(self) -> dict[str, str]:
        return self.pip_versions("taskiq", "taskiq-nats", "nats-py")
