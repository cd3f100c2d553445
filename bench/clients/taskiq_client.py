from bench.peer_tasks import taskiq_app


class Client:
    tasks = {"noop": taskiq_app.noop, "sleep": taskiq_app.sleep1}

    async def enqueue(self, kind: str, key: str, i: int, t: float) -> str:
        # kiq awaits the JetStream publish ack
        return (await self.tasks[kind].kiq(key, i, t)).task_id

    async def close(self) -> None:
        await taskiq_app.broker.shutdown()


async def open_client(cfg: dict) -> Client:
    await taskiq_app.broker.startup()
    return Client()
