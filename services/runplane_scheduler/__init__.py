"""The scheduler: the run engine, the only writer of the database."""
