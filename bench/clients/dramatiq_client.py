from bench.peer_tasks import dramatiq_app


class Client:
    tasks = {"noop": dramatiq_app.noop, "sleep": dramatiq_app.sleep1}

    async def enqueue(self, kind: str, key: str, i: int, t: float) -> str:
        return self.enqueue_sync(kind, key, i, t)

    def enqueue_sync(self, kind: str, key: str, i: int, t: float) -> str:
        return self.tasks[kind].send(key, i, t).message_id  # synchronous redis enqueue

    async def close(self) -> None:
        dramatiq_app.broker.close()


async def open_client(cfg: dict) -> Client:
    return Client()
