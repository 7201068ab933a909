"""florist on Flower: a ServerApp and a ClientApp over the same components as ``florist run``.

* ``florist.flower.server_app:app`` / ``florist.flower.client_app:app``: the Flower apps;
* ``florist.flower.strategy.FloristStrategy``: FedAvg's loop with florist's aggregation, any method;
* ``florist.flower.payload``: adapters <-> ArrayRecords, validated on arrival;
* ``florist.flower.app_config``: the app project (pyproject.toml) and run config from ``RunConfig``;
* ``florist.flower.local.LocalFederation``: SuperLink + SuperNodes as local processes (tests, trials).

See docs/flower.md for running across machines.
"""
