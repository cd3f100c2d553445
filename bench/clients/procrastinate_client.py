from bench.peer_tasks import procrastinate_app


class Client:
    tasks = {"noop": procrastinate_app.noop, "sleep": procrastinate_app.sleep1}

    async def enqueue(self, kind: str, key: str, i: int, t: float) -> int:
        return await self.tasks[kind].defer_async(k=key, i=i, t=t)  # one INSERT transaction

    async def close(self) -> None:
        await procrastinate_app.app.close_async()


async def open_client(cfg: dict) -> Client:
    await procrastinate_app.app.open_async()
    return Client()
