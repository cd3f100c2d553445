"""The ``runplane`` command line: ``main`` parses the commands and runs the API ones (trigger,
runs, queues, schedules) with the SDK's client; ``keys`` manages keys and migrations straight
against the database; ``dev`` runs every service locally. Unlike the SDK it may import the
services, which is why it is a package of its own."""
