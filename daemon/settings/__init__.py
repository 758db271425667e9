"""Settings from the environment or the unit's files (``config``, ``envreader``, ``envfile``, ``service_env``)
and logging (``logs``)."""
