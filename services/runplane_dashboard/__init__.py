"""runplane's web dashboard: runs, their waterfalls, batches, queues, schedules, wait tokens and
worker versions, server-rendered by aiohttp. A client of the public API through the SDK; users
log in with a secret key and see that key's environment only."""
