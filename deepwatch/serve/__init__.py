"""Serving: the REST scoring service with its dashboard (app.py) and the Kafka stream worker."""
