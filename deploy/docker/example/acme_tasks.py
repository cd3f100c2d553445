"""The example task module of ``deploy/docker/example``: the image built ``FROM`` runplane copies
it to ``/app``, and the executor runs it with ``runplane executor --tasks acme_tasks``."""

from __future__ import annotations

from pydantic import BaseModel

from runplane import Context, queue, task

greetings = queue(name="greetings", concurrency_limit=10)


class Greeting(BaseModel):
    name: str


@task(id="acme-greet", queue=greetings, retry={"max_attempts": 3})
async def greet(payload: Greeting, ctx: Context) -> dict[str, object]:
    """Greets someone; the output names the attempt that ran."""
    return {"message": f"Hello, {payload.name}!", "attempt": ctx.attempt.number}
