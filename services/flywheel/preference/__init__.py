"""The preference service: authenticated ingestion of human feedback, Bradley–Terry consensus, datasets.

Modules, top to bottom:
- `settings.py`   PreferenceSettings (FLYWHEEL_PREFERENCE_*).
- `auth.py`       bearer tokens (stored as sha256), issued/revoked by the CLI.
- `store.py`      the SQLite event store (rebuildable from the preferences topic).
- `replay.py`     followers that replay a topic into the store (rollouts -> known responses,
                  preferences -> events), with offsets kept in the same transaction.
- `validation.py` field-level validation and normalisation of submitted events.
- `aggregation.py` vectorised Bradley–Terry/Davidson fit with crowd-BT rater reliability.
- `engine.py`     the global fit (rater weights, gold counts) and per-prompt consensus from the store.
- `rater_mixes.py` synthetic rater pools with a hidden truth (reliability tests and benchmark).
- `export.py`     JSONL/Parquet datasets for reward-model training and SFT.
- `service.py`    the gRPC servicer; `app.py` wires it into the shared runtime.
- `simulated_rater.py` VADER-ground-truth raters (honest, noisy, random, adversarial).
"""
