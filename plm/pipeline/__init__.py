"""The whole PLM pipeline as resumable stages (`plm pipeline`, `plm demo`): `config` (the typed
recipe), `engine` (manifests, skipping, --from), `stages` (one thin call per stage), `run`
(loading every recipe up front, running, writing report.md)."""
