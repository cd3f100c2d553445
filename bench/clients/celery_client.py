from bench.peer_tasks import celery_app


class Client:
    tasks = {"noop": celery_app.noop, "sleep": celery_app.sleep1}

    async def enqueue(self, kind: str, key: str, i: int, t: float) -> str:
        return self.enqueue_sync(kind, key, i, t)

    def enqueue_sync(self, kind: str, key: str, i: int, t: float) -> str:
        return self.tasks[kind].delay(key, i, t).id  # synchronous redis LPUSH

    async def close(self) -> None:
        celery_app.app.close()


async def open_client(cfg: dict) -> Client:
    return Client()
